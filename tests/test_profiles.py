"""Profiles are typed, self-validating and the one place where a profile's paths and run specs are built:
the specs the notebooks build (and so every run folder a reader already has) stay what they were."""

from dataclasses import replace
from pathlib import Path

import pytest

from tinyvit_lib.data import DataSpec
from tinyvit_lib.experiment import RunSpec
from tinyvit_lib.profiles import (
    CONDITIONS,
    PATIENCE_CONDITIONS,
    PROFILES,
    STORES,
    Budget,
    OwnData,
    Profile,
    Sweep,
    condition_runs,
    distillation_runs,
    patience_spec,
    pretrain_spec,
    project_root,
    resolve_profile,
    run_spec,
    scratch,
    store_specs,
    sweep_spec,
    teacher_spec,
)
from tinyvit_lib.trainer import TrainConfig


@pytest.fixture
def default(monkeypatch) -> Profile:
    monkeypatch.delenv("TINYVIT_FAST", raising=False)
    return resolve_profile("default")


def test_the_fast_switch_wins_and_an_unknown_name_lists_the_profiles(monkeypatch):
    monkeypatch.setenv("TINYVIT_FAST", "1")
    assert resolve_profile("default").name == "fast"
    monkeypatch.setenv("TINYVIT_FAST", "0")  # compared to "1" exactly, not by truthiness
    assert resolve_profile("default").name == "default"
    with pytest.raises(ValueError, match="unknown profile 'laptop'.*cifar100.*default.*fast.*imagenet-subset"):
        resolve_profile("laptop")


def test_paths_are_absolute_under_the_project_and_computed_in_one_place(default):
    root = project_root()
    assert default.runs_dir == root / "runs" / "default" and default.runs_dir.is_absolute()
    assert default.teacher_checkpoint == root / "runs/default/teacher/best.pt"
    assert default.teacher_checkpoint == teacher_spec(default).run_dir / "best.pt"
    assert default.store_path("static") == root / "logits/default/static"
    assert default.store_path("replay") == default.store_path("replay", k=10) == root / "logits/default/replay"
    assert default.store_path("replay", k=3) == root / "logits/default/replay_k3"
    assert default.store_path("pool") == root / "logits/default/pool"
    assert default.results_file("05_sweep.jsonl") == root / "results/default/05_sweep.jsonl"
    assert default.figures_dir == root / "figures"
    fast = PROFILES["fast"]
    assert fast.runs_dir == root / "build/fast/runs/fast" and fast.figures_dir == root / "build/fast/figures"


@pytest.mark.parametrize(
    "mode, k, message",
    [
        ("online", None, "unknown store 'online'"),
        ("static", 3, "no static store with k=3"),
        ("pool", 3, "no pool store with k=3"),
        ("replay", 11, "no replay store with k=11"),
    ],
)
def test_a_store_that_cannot_exist_has_no_path(default, mode, k, message):
    with pytest.raises(ValueError, match=message):
        default.store_path(mode, k)


def test_the_gpu_profiles_read_data_root_when_resolved(monkeypatch):
    monkeypatch.delenv("TINYVIT_FAST", raising=False)
    monkeypatch.setenv("DATA_ROOT", "/data/cifar")
    assert resolve_profile("cifar100").data_root == "/data/cifar"
    assert run_spec(resolve_profile("cifar100"), "x").data.root == "/data/cifar"
    assert resolve_profile("default").data_root is None  # Fashion-MNIST is found without it
    monkeypatch.delenv("DATA_ROOT")
    assert resolve_profile("imagenet-subset").data_root is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Budget(epochs=0, batch_size=8, lr=1e-3), r"Budget.epochs=0 must be >= 1"),
        (lambda: Budget(epochs=1, batch_size=8, lr=0.0), r"Budget.lr=0.0 must be > 0"),
        (lambda: Budget(epochs=1, batch_size=8, lr=1e-3, max_per_class=0), r"Budget.max_per_class=0"),
        (lambda: Sweep(alphas=(0.5, 1.5), epochs=2), r"Sweep.alphas holds \[1.5\]: each must be in \[0, 1\]"),
        (lambda: Sweep(temperatures=(), epochs=2), r"Sweep.temperatures is empty"),
        (lambda: Sweep(epochs=0), r"Sweep.epochs=0"),
        (lambda: replace(PROFILES["fast"], k=3), r"Profile.sweep.ks=\(1, 5\) exceeds k=3"),
        (lambda: replace(PROFILES["fast"], replay_epochs=1), r"Profile.student.epochs=2 exceeds replay_epochs=1"),
        (lambda: replace(PROFILES["fast"], dataset="mnist"), r"Profile.dataset='mnist' is unknown"),
        (lambda: replace(PROFILES["fast"], seeds=()), r"Profile.seeds is empty"),
        (lambda: replace(PROFILES["fast"], seeds=(0, 0)), r"Profile.seeds=\(0, 0\) repeats a seed"),
        (lambda: OwnData(batch_size=0), r"OwnData.batch_size=0 must be >= 1"),
        (lambda: replace(PROFILES["fast"], patience=(1, 3)), r"Profile.patience\[1\]=3 exceeds replay_epochs=2"),
        (lambda: replace(PROFILES["fast"], patience=()), r"Profile.patience=\(\): give at least one"),
        (lambda: replace(PROFILES["fast"], val_per_class=0), r"Profile.val_per_class=0 must be >= 1"),
        (
            lambda: replace(PROFILES["fast"], finetune=Budget(epochs=1, batch_size=8, lr=1e-3, max_per_class=5)),
            r"finetune.max_per_class=5 differs from student.max_per_class=12",
        ),
    ],
)
def test_a_wrong_value_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_every_profile_sweeps_within_its_store_and_spans_its_patience_curve():
    for profile in PROFILES.values():
        assert max(profile.sweep.ks) <= profile.k and profile.sweep.epochs <= profile.replay_epochs
        if profile.name != "fast":  # a result: 3 seeds, schedule lengths spanning at least 4x (long: 3 or more, 64x)
            lengths, span = (3, 64) if profile.name == "long" else (2, 4)
            assert len(profile.patience) >= lengths and max(profile.patience) >= span * min(profile.patience)
            assert len(profile.seeds) >= 3


def test_the_default_replay_student_is_pinned_field_by_field(default):
    # Pinned: a changed profile or builder would silently retrain every committed result.
    replay = distillation_runs(default, 1)["replay store"]
    config = TrainConfig(epochs=4, batch_size=128, lr=2e-3, warmup_epochs=1.0, seed=1, alpha=1.0, temperature=1.0)
    data = DataSpec(
        dataset="fashion-mnist",
        img_size=32,
        augment="light",
        max_per_class=300,
        max_val_per_class=50,
        val_per_class=500,
    )
    assert replay == RunSpec(
        name="tinyvit_5m_replay_a1_t1_s1",
        data=data,
        model="tinyvit_5m",
        logits_path=str(project_root() / "logits/default/replay"),
        output_dir=str(project_root() / "runs/default"),
        train=config,
    )
    teacher = teacher_spec(default)
    assert (teacher.model, teacher.data.max_per_class, teacher.data.val_per_class, teacher.train.epochs) == (
        "resnet18",
        None,
        500,
        2,
    )
    online = distillation_runs(default, 0)["online teacher"]
    assert online.teacher_checkpoint == str(default.teacher_checkpoint) and online.logits_path is None
    mixed = distillation_runs(default, 0)["mixed store"]
    assert mixed.data.mix == "function-matching" and replay.data.mix is None
    assert mixed.logits_path == str(default.store_path("mixed"))


def test_the_four_conditions_share_seed_labelled_set_and_budget(default):
    runs = condition_runs(default, 2)
    assert list(runs) == list(CONDITIONS)
    finals = [chain[-1] for chain in runs.values()]
    assert {(s.data.max_per_class, s.data.val_per_class, s.train.seed, s.train.epochs, s.model) for s in finals} == {
        (300, 500, 2, 4, "tinyvit_5m")
    }
    distilled, supervised = runs["pretrain-distilled"][0], runs["pretrain-supervised"][0]
    assert distilled.data.max_per_class is None and supervised.data.max_per_class is None  # the whole pool
    assert (distilled.train.alpha, distilled.logits_path) == (1.0, str(default.store_path("pool")))
    assert (supervised.distills, supervised.logits_path, supervised.teacher_model) == (False, None, None)
    for pretrained, finetuned in (runs["pretrain-distilled"], runs["pretrain-supervised"]):
        assert finetuned.init_from == str(pretrained.run_dir / "last.pt")
        assert (finetuned.distills, finetuned.train.lr) == (False, default.finetune.lr)
    assert pretrain_spec(default, 0, distilled=True, max_per_class=7).name == "tinyvit_5m_pretrain_distilled_p7_s0"


def test_patience_runs_reuse_notebook_03_and_warm_up_a_quarter_of_a_short_schedule(default):
    for condition, kind in zip(PATIENCE_CONDITIONS, ("baseline", "static store", "replay store", "mixed store")):
        assert patience_spec(default, 0, condition, 4) == distillation_runs(default, 0)[kind]
    short = patience_spec(default, 1, "function matching", 2)
    assert short.name == "tinyvit_5m_mixed_a1_t1_e2_s1" and short.train.epochs == 2
    assert short.train.warmup_epochs == 0.5
    with pytest.raises(ValueError, match="unknown patience condition 'teacher'"):
        patience_spec(default, 0, "teacher", 4)
    # a profile whose patience run at the student budget validates less often is another run, in
    # another folder: it must not retrain notebook 03's (the fast profile: 2 epochs, one validation)
    fast = resolve_profile("fast")
    rare = patience_spec(fast, 0, "labels only", fast.student.epochs)
    ours = distillation_runs(fast, 0)["baseline"]
    assert rare.train.eval_every == 2 and rare.name == ours.name + "_v2" and rare.run_dir != ours.run_dir


def test_sweep_names_follow_the_rule(default):
    assert sweep_spec(default, 0) == distillation_runs(default, 0)["replay store"]  # notebook 03's run, reused
    assert sweep_spec(default, 0, alpha=0.25, temperature=4.0).name == "tinyvit_5m_replay_a0.25_t4_s0"
    smaller = sweep_spec(default, 0, temperature=2.0, k=3)
    assert smaller.name == "tinyvit_5m_replay_a1_t2_s0_k3"
    assert Path(smaller.logits_path) == default.store_path("replay", 3)
    assert sweep_spec(default, 0, model="tinyvit_21m").name == "tinyvit_21m_replay_a1_t1_s0"
    longer = replace(default, sweep=replace(default.sweep, epochs=6))
    point = sweep_spec(longer, 0, k=1)
    assert point.name == "tinyvit_5m_replay_a1_t1_e6_s0_k1" and point.train.epochs == 6
    assert point.train.warmup_epochs == 1.0


def test_an_unknown_role_is_refused(default):
    with pytest.raises(ValueError, match="unknown role 'teachr'"):
        run_spec(default, "x", role="teachr")


def test_the_stores_cover_exactly_the_data_of_their_students(default):
    from tinyvit_lib.distill import store_spec_differences
    from tinyvit_lib.logit_store import StoreHeader

    stores = store_specs(default)
    assert list(stores) == list(STORES)
    students = distillation_runs(default, 0)
    readers = {
        "static": students["static store"],
        "replay": students["replay store"],
        "mixed": students["mixed store"],
        "pool": pretrain_spec(default, 0, distilled=True),
    }
    for name, (mode, spec, epochs) in stores.items():
        header = StoreHeader(
            teacher={},
            dataset={"size": 10},
            img_size=32,
            transform="",
            mode=mode,
            k=10,
            num_classes=10,
            epochs=epochs,
            data_seed=0,
            data=spec.for_store(),
        )
        assert store_spec_differences(header, readers[name].data) == [], name
        assert Path(readers[name].logits_path) == default.store_path(name)
    variant = pretrain_spec(default, 0, distilled=True, max_per_class=default.sweep.variant_pool_per_class)
    pool_header = StoreHeader(
        teacher={},
        dataset={"size": 10},
        img_size=32,
        transform="",
        mode="replay",
        k=10,
        num_classes=10,
        epochs=1,
        data_seed=0,
        data=stores["pool"][1].for_store(),
    )
    assert store_spec_differences(pool_header, variant.data) == []  # a cut of the pool reads the pool store
    assert store_spec_differences(pool_header, students["replay store"].data) == []


def test_the_long_profile_reaches_the_regime_where_patience_shows():
    P = PROFILES["long"]
    images = P.student.max_per_class * 10  # Fashion-MNIST's 10 classes
    steps = [e * (images // P.student.batch_size) for e in P.patience]
    assert P.patience[-1] / P.patience[0] >= 64 and steps[-1] >= 6500 and P.patience[-1] >= 300
    assert P.replay_epochs == P.patience[-1] and P.notebooks == ("02", "04")
    assert P.figure("04_patience.png").name == "04_patience_long.png" and P.results_dir.name == "long"
    spec = patience_spec(P, 0, "consistent teacher", P.patience[-1])
    assert spec.train.eval_every == P.patience[-1] // 16 and spec.train.batch_size == 32


def test_a_scratch_profile_writes_under_build_try_and_reads_the_course_teacher_and_stores():
    P = PROFILES["default"]
    S = scratch(P)
    root = project_root()
    assert (
        S.runs_dir == root / "build/try/runs/default"
        and S.figure("03_conditions.png").parent == root / "build/try/figures/default"
    )
    assert scratch(S).store_path("replay") == P.store_path("replay")  # scratched twice: still the course's stores
    assert S.results_file("03_students.jsonl") == root / "build/try/results/default/03_students.jsonl"
    # notebook 02's products are read from the course: its teacher, stores and their results rows
    assert S.teacher_checkpoint == P.teacher_checkpoint and S.store_path("replay") == P.store_path("replay")
    assert S.results_file("02_teacher.jsonl") == P.results_file("02_teacher.jsonl")
    own = scratch(P, own_teacher_and_stores=True)
    assert own.teacher_checkpoint == root / "build/try/runs/default/teacher/best.pt"
    assert own.store_path("pool").is_relative_to(root / "build/try") and own.results_file(
        "02_stores.json"
    ).is_relative_to(root / "build/try")
    # nothing a scratch profile writes lands in a tracked folder
    for path in (S.runs_dir, S.results_dir, S.figures_dir, own.logits_dir):
        assert path.is_relative_to(root / "build")
