"""Profiles are typed, self-validating and the one place where a profile's paths and run specs are built:
the specs the notebooks build (and so every run folder a reader already has) stay what they were."""

from dataclasses import replace
from pathlib import Path

import pytest

from tinyvit_lib.experiment import RunSpec
from tinyvit_lib.profiles import (
    PROFILES,
    Budget,
    Profile,
    Sweep,
    distillation_runs,
    project_root,
    resolve_profile,
    run_spec,
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
    assert default.results_file("04_sweep.jsonl") == root / "results/default/04_sweep.jsonl"
    assert default.figures_dir == root / "figures"
    fast = PROFILES["fast"]
    assert fast.runs_dir == root / "build/fast/runs/fast" and fast.figures_dir == root / "build/fast/figures"


@pytest.mark.parametrize(
    "mode, k, message",
    [
        ("online", None, "unknown store mode 'online'"),
        ("static", 3, "no static store with k=3"),
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
    assert run_spec(resolve_profile("cifar100"), "x").data_root == "/data/cifar"
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
    ],
)
def test_a_wrong_value_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_every_profile_sweeps_within_its_store():
    for profile in PROFILES.values():
        assert max(profile.sweep.ks) <= profile.k and profile.sweep.epochs <= profile.replay_epochs


def test_the_default_replay_student_is_the_run_it_always_was(default):
    # Pinned field by field: a changed profile or builder would silently retrain every committed result.
    replay = distillation_runs(default, 1)["replay store"]
    config = TrainConfig(
        epochs=4, batch_size=128, lr=2e-3, warmup_epochs=1.0, seed=1, distill_alpha=1.0, distill_temp=1.0
    )
    assert replay == RunSpec(
        name="tinyvit_5m_replay_a1_t1_s1",
        dataset="fashion-mnist",
        model="tinyvit_5m",
        img_size=32,
        augment="light",
        max_per_class=300,
        max_val_per_class=200,
        logits_path=str(project_root() / "logits/default/replay"),
        output_dir=str(project_root() / "runs/default"),
        train=config,
    )
    teacher = teacher_spec(default)
    assert (teacher.model, teacher.max_per_class, teacher.train.epochs, teacher.train.warmup_epochs) == (
        "resnet18",
        None,
        2,
        0.5,
    )
    online = distillation_runs(default, 0)["online teacher"]
    assert online.teacher_checkpoint == str(default.teacher_checkpoint) and online.logits_path is None


def test_sweep_names_follow_the_rule(default):
    assert sweep_spec(default, 0) == distillation_runs(default, 0)["replay store"]  # notebook 03's run, reused
    assert sweep_spec(default, 0, alpha=0.25, temperature=4.0).name == "tinyvit_5m_replay_a0.25_t4_s0"
    smaller = sweep_spec(default, 0, temperature=2.0, k=3)
    assert smaller.name == "tinyvit_5m_replay_a1_t2_s0_k3"
    assert Path(smaller.logits_path) == default.store_path("replay", 3)
    assert sweep_spec(default, 0, model="tinyvit_21m").name == "tinyvit_21m_replay_a1_t1_s0"
    longer = replace(default, replay_epochs=6, sweep=replace(default.sweep, epochs=6))
    point = sweep_spec(longer, 0, k=1)
    assert point.name == "tinyvit_5m_replay_a1_t1_s0_k1_e6" and point.train.epochs == 6
    assert point.train.warmup_epochs == 1.0  # from the student budget, as before: only the epochs change


def test_an_unknown_role_is_refused(default):
    with pytest.raises(ValueError, match="unknown role 'teachr'"):
        run_spec(default, "x", role="teachr")
