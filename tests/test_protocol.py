"""The course's protocol: a validation set carved from the training split by permanent ID (never a
training image, never a mixing partner), the pool and the labelled set, fine-tuning from a
checkpoint, test numbers only for runs that never looked at the test set, choices made on
validation, and gains paired by seed with their standard error."""

from dataclasses import asdict, replace

import pytest
import torch
from test_logit_store import tiny_teacher

from tinyvit_lib import MIX_PRESETS, AugmentConfig, get_dataset
from tinyvit_lib.data import DataSpec, SubsetWithIDs, build, carve_validation, training_images, validation_indices
from tinyvit_lib.distill import StoredTeacher, precompute
from tinyvit_lib.experiment import (
    ResultsLog,
    RunSpec,
    choose_on_validation,
    condition_summary,
    load_trained,
    paired_gain,
    prepare_run,
    run_differences,
    run_or_reuse,
    sweep_point,
    validation_set,
)
from tinyvit_lib.experiment import test_set as final_test_set  # not a test: pytest collects test_*
from tinyvit_lib.stats import describe_gain, t_multiplier, t_quantile
from tinyvit_lib.trainer import TrainConfig, evaluate
from tinyvit_lib.utils import load_checkpoint

LIGHT = AugmentConfig(randaugment_ops=0, erase_prob=0.0, scale=(0.5, 1.0))
MATCHING = MIX_PRESETS["function-matching"]


def _spec(tmp_path, max_per_class: int = 3, val_per_class: int | None = 4, **changes) -> RunSpec:
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0, seed=0)
    data = DataSpec(
        dataset="synthetic", img_size=32, max_per_class=max_per_class, max_val_per_class=2, val_per_class=val_per_class
    )
    spec = RunSpec(name="run", data=data, output_dir=str(tmp_path / "runs"), train=config)
    return replace(spec, **changes)


def test_the_validation_carve_is_chosen_by_permanent_id_alone():
    dataset = get_dataset("synthetic", split="train", num_samples=200)
    chosen = [dataset.ids[i] for i in validation_indices(dataset, 5)]
    assert len(chosen) == 50 and sorted(chosen) == chosen  # ascending positions, ID order
    assert all(sum(dataset.targets[dataset.ids.index(i)] == c for i in chosen) == 5 for c in range(10))
    # The same images in another order (a subset listing them backwards) carve the same IDs.
    backwards = SubsetWithIDs(dataset, list(reversed(range(len(dataset)))))
    assert sorted(backwards.ids[i] for i in validation_indices(backwards, 5)) == chosen
    # More images: the carve does not move (a hash per ID, not a shuffle): an image of the smaller set
    # carved from the bigger one ranks among its class's lowest hashes in the smaller set too.
    bigger = get_dataset("synthetic", split="train", num_samples=400)
    kept = {bigger.ids[i] for i in validation_indices(bigger, 5)}
    assert set(dataset.ids) & kept and set(dataset.ids) & kept <= set(chosen)
    with pytest.raises(ValueError, match=r"val_per_class=20: class 'pattern 0' has 20 training image\(s\)"):
        validation_indices(dataset, 20)
    with pytest.raises(ValueError, match="val_per_class=0 must be >= 1"):
        validation_indices(dataset, 0)


def test_pool_validation_and_labelled_set_are_disjoint_and_pair_within_themselves():
    dataset = get_dataset("synthetic", split="train", num_samples=200, augment=LIGHT, mix=MATCHING)
    pool, val = carve_validation(dataset, 4)
    assert not set(pool.ids) & set(val.ids) and len(pool) + len(val) == len(dataset)
    labelled = training_images(dataset, val_per_class=4, max_per_class=3)
    assert set(labelled.ids) <= set(pool.ids) and len(labelled) == 30
    for part in (pool, labelled):
        assert part.pair_root() == (part, None)  # a validation image is never a training image's partner
        partners = part.partners(list(range(len(part))), epoch=0)
        assert set(partners) <= set(range(len(part)))
    uncut = training_images(dataset, max_per_class=3)  # no carve: a subset pairs as its parent (as before)
    assert uncut.pair_root()[0] is dataset


def test_a_mixed_store_of_the_labelled_set_is_written_and_read(tmp_path):
    dataset = get_dataset("synthetic", split="train", num_samples=120, augment=LIGHT, mix=MATCHING)
    labelled = training_images(dataset, val_per_class=2, max_per_class=4)
    store = precompute(tiny_teacher(), labelled, tmp_path / "mixed", k=4, mode="replay", epochs=1, progress=False)[0]
    again = training_images(
        get_dataset("synthetic", split="train", num_samples=120, augment=LIGHT, mix=MATCHING),
        val_per_class=2,
        max_per_class=4,
    )
    StoredTeacher(store, again, epochs=1)  # the student's own labelled set fits the store


def test_the_datasets_of_a_carved_run_and_the_test_set_only_for_it(tmp_path):
    spec = _spec(tmp_path)
    train_set, val_set = build(spec.data)
    whole = validation_set(spec)
    assert len(train_set) == 30 and len(val_set) == 20 and len(whole) == 40
    assert set(val_set.ids) <= set(whole.ids) and not set(whole.ids) & set(train_set.ids)
    assert all(i.startswith("train/") for i in whole.ids)
    assert len(final_test_set(spec)) == 256 and final_test_set(spec).ids[0].startswith("test/")
    held_out = _spec(tmp_path, val_per_class=None)  # validates on the held-out split (quick runs)
    assert validation_set(held_out).ids[0].startswith("test/")
    with pytest.raises(ValueError, match=r"run 'run': val_per_class=None: this data validates on the held-out split"):
        final_test_set(held_out)


def test_a_fine_tuning_run_starts_from_its_checkpoint_and_knows_which(tmp_path):
    pretrained = _spec(tmp_path, name="pretrain", max_per_class=6)
    run_or_reuse(pretrained, progress=False)
    checkpoint = pretrained.run_dir / "last.pt"
    finetune = _spec(tmp_path, name="finetune", init_from=str(checkpoint))
    start = prepare_run(finetune).model.state_dict()
    saved = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert not all(torch.equal(start[k], v) for k, v in prepare_run(_spec(tmp_path)).model.state_dict().items())
    run_or_reuse(finetune, progress=False)
    assert run_or_reuse(finetune, progress=False).reused
    run_or_reuse(replace(pretrained, train=replace(pretrained.train, lr=2e-3)), progress=False)  # re-pretrained
    differences = run_differences(finetune, load_checkpoint(finetune.run_dir / "last.pt"))
    assert [d.split(":")[0] for d in differences] == ["init_from (content hash)"]
    assert not run_or_reuse(finetune, progress=False).reused


def test_a_data_root_spelled_otherwise_is_the_same_run(tmp_path):
    spec = _spec(tmp_path, data=DataSpec(dataset="synthetic", root="/data/imgs"))
    assert spec.data.root == "/data/imgs" and DataSpec(dataset="synthetic", root="/data/./imgs/").root == "/data/imgs"

    # a checkpoint saved before roots were normalised still names the same run
    def saved_with(root: str) -> dict:
        ran = {k: v for k, v in asdict(spec).items() if k != "train"}  # the config is saved apart
        ran["data"] = dict(ran["data"], root=root)
        return dict(model_config=dict(spec=ran), config=asdict(spec.train))

    assert run_differences(spec, saved_with("/data/imgs/")) == []
    moved = saved_with("/x")
    assert run_differences(spec, moved) == ["data.root: run '/x', asked '/data/imgs'"]


def test_a_row_holds_test_numbers_only_when_asked(tmp_path):
    results = ResultsLog(tmp_path / "rows.jsonl")
    spec = _spec(tmp_path)
    row = sweep_point(results, "a", spec, condition="labels only", seed=0)
    assert {"val_top1", "val_top5"} <= set(row) and row["test_top1"] is None and row["test_top5"] is None
    reported = sweep_point(results, "a", spec, test=True, condition="labels only", seed=0)
    assert reported["val_top1"] == row["val_top1"] and reported["test_top1"] is not None
    model = load_trained(spec.run_dir / "last.pt")  # the numbers are the final weights' on each split
    for split, dataset in (("val", validation_set(spec)), ("test", final_test_set(spec))):
        metrics = evaluate(model, dataset)
        assert [reported[f"{split}_top1"], reported[f"{split}_top5"]] == [
            round(metrics["top1"], 2),
            round(metrics["top5"], 2),
        ], split
    assert sweep_point(ResultsLog(tmp_path / "rows.jsonl"), "a", spec, test=True) == reported  # logged, reused
    with pytest.raises(ValueError, match="validates on the held-out split"):
        sweep_point(results, "b", _spec(tmp_path, name="b", val_per_class=None), test=True)


def test_choices_are_made_on_validation_numbers_only():
    rows = [dict(key="a", val_top1=70.0, test_top1=90.0), dict(key="b", val_top1=80.0, test_top1=60.0)]
    assert choose_on_validation(rows)["key"] == "b"
    with pytest.raises(ValueError, match="choose on validation numbers, not 'test_top1'"):
        choose_on_validation(rows, "test_top1")
    with pytest.raises(ValueError, match="every row needs 'val_top1'"):
        choose_on_validation([*rows, dict(key="c", test_top1=99.0)])


def test_t_multipliers_are_students():
    # two-sided 95% multipliers from tables of Student's t: 12.706 (1 dof), 4.303 (2), 2.776 (4), 2.262 (9)
    for n, t in ((2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262)):
        assert abs(t_multiplier(n) - t) < 1e-3
    assert abs(t_multiplier(3, level=0.8) - 1.886) < 1e-3 and abs(t_quantile(0.025, 2) + 4.303) < 1e-3
    with pytest.raises(ValueError, match="n=1: an interval needs at least two values"):
        t_multiplier(1)
    with pytest.raises(ValueError, match="p=1.0 must be in"):
        t_quantile(1.0, 3)
    # the median, and levels so small that t^2 vanishes beside the degrees of freedom
    assert abs(t_quantile(0.5, 3)) < 1e-9 and abs(t_multiplier(3, level=1e-12)) < 1e-6
    assert abs(t_quantile(0.5000001, 1000)) < 1e-6


def test_gains_are_paired_by_seed_with_a_95_percent_t_interval():
    rows = [
        *(dict(condition="labels only", seed=s, test_top1=v) for s, v in ((0, 80.0), (1, 82.0), (2, 81.0))),
        *(dict(condition="distilled", seed=s, test_top1=v) for s, v in ((2, 84.0), (0, 83.0), (1, 84.0))),
    ]
    gain = paired_gain(rows, "distilled", "labels only")
    # gains 3, 2, 3: mean 2.67, sample sd 0.577, SE 0.333
    assert gain["per_seed"] == {0: 3.0, 1: 2.0, 2: 3.0} and (gain["mean"], gain["se"], gain["n"]) == (2.67, 0.33, 3)
    # 95%: 2.667 +- 4.303 x 0.333 (2 dof), not the 82% of +-2 SE
    assert gain["t"] == 4.3 and gain["interval"] == (1.23, 4.1) and gain["resolved"] and gain["z"] == 8.0
    assert describe_gain(gain) == "+2.67 [+1.23, +4.10] (95% t-interval, t = 4.30 at 3 seeds; resolved)"
    summary = condition_summary(rows, "test_top1")
    assert list(summary) == ["labels only", "distilled"] and summary["labels only"]["mean"] == 81.0
    assert summary["labels only"]["se"] == 0.58 and summary["distilled"]["per_seed"][2] == 84.0
    assert summary["labels only"]["half_width"] == 2.48  # 4.303 x 0.577
    noisy = [*rows[:3], *(dict(r, test_top1=r["test_top1"] - 3.5 + 2 * r["seed"]) for r in rows[3:])]
    assert not paired_gain(noisy, "distilled", "labels only")["resolved"]
    # +-2 SE would call gains 3, 1, 3 resolved (2.33 +- 1.33 excludes zero); the 95% interval does not
    wide = [*rows[:3], *(dict(r, test_top1=r["test_top1"] - (r["seed"] == 1)) for r in rows[3:])]
    assert paired_gain(wide, "distilled", "labels only")["interval"][0] < 0
    one = paired_gain(rows[:1] + rows[4:5], "distilled", "labels only")
    assert one["se"] is None and one["interval"] is None and not one["resolved"]
    with pytest.raises(ValueError, match=r"'distilled' has seeds \[0, 2\], 'labels only' has \[0, 1, 2\]"):
        paired_gain(rows[:5], "distilled", "labels only")
    twice = [*rows, dict(condition="labels only", seed=0, test_top1=70.0)]  # a seed counted twice is refused
    with pytest.raises(ValueError, match="two rows of condition 'labels only', seed 0: each seed counts once"):
        paired_gain(twice, "distilled", "labels only")
    with pytest.raises(ValueError, match="two rows of condition 'labels only', seed 0"):
        condition_summary(twice, "test_top1")
    unmeasured = [dict(r, test_top1=None) if r["condition"] == "distilled" else r for r in rows]
    with pytest.raises(ValueError, match=r"condition 'distilled', seed 2: test_top1=None is not a number"):
        paired_gain(unmeasured, "distilled", "labels only")
    other = [dict(condition="other", seed=0, test_top1=None)] * 2  # other conditions' rows are not read
    assert paired_gain([*rows, *other], "distilled", "labels only") == gain
