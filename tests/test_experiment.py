"""Runs described by values: a finished run is reused only while it is exactly the asked-for run
(spec, config and teacher); the sweep's results log keeps one row per key across restarts, and a
logged sweep point is reused only while it was measured on the weights now on disk."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tinyvit_lib import experiment
from tinyvit_lib.data import DataSpec, training_set
from tinyvit_lib.distill import precompute
from tinyvit_lib.experiment import (
    ResultsLog,
    RunSpec,
    autocast_identity,
    checkpoint_identity,
    init_notes,
    prepare_run,
    reusable_row,
    row_line,
    run_digest,
    run_or_reuse,
    spec_digest,
    sweep_point,
    teacher_identity,
)
from tinyvit_lib.teachers import build_model
from tinyvit_lib.trainer import TrainConfig


def _spec(tmp_path, augment: str = "light", **changes) -> RunSpec:
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0, seed=0)
    data = DataSpec(dataset="synthetic", img_size=32, augment=augment, max_per_class=4, max_val_per_class=2)
    return replace(
        RunSpec(name="run", data=data, model="tinyvit_5m", output_dir=str(tmp_path / "runs"), train=config),
        **changes,
    )


def test_run_or_reuse_reuses_only_the_same_run(tmp_path):
    spec = _spec(tmp_path)
    first = run_or_reuse(spec, progress=False)
    assert not first.reused and len(first.history) == 1
    mtime = (spec.run_dir / "last.pt").stat().st_mtime_ns
    again = run_or_reuse(spec, progress=False)
    assert again.reused and again.history == first.history
    assert (spec.run_dir / "last.pt").stat().st_mtime_ns == mtime  # nothing was trained or written
    digest = run_digest(spec.run_dir)
    assert run_digest(spec.run_dir) == digest and len(digest) == 16
    changed = run_or_reuse(replace(spec, train=replace(spec.train, lr=2e-3)), progress=False)
    assert not changed.reused  # another config in the same folder: trained again
    assert run_digest(spec.run_dir) != digest  # other weights: a result logged for the first run is stale
    assert not run_or_reuse(spec, progress=False, force=True).reused


def test_a_run_from_an_older_store_is_not_reused(tmp_path):
    spec = _spec(tmp_path, augment="none")
    train_set = training_set(spec.data)
    teacher = build_model("resnet18", num_classes=train_set.num_classes, img_size=32).eval()
    store = tmp_path / "store"
    precompute(teacher, train_set, store, k=3, progress=False)
    distilled = replace(spec, name="kd", logits_path=str(store), train=replace(spec.train, alpha=0.5))
    identity = teacher_identity(distilled)
    assert identity and run_or_reuse(distilled, progress=False).reused is False
    assert run_or_reuse(distilled, progress=False).reused
    # The store is remade by another teacher at the same path: the run must not be taken for current.
    for p in store.iterdir():
        p.unlink()
    store.rmdir()
    torch.manual_seed(1)
    precompute(
        build_model("resnet18", num_classes=train_set.num_classes, img_size=32).eval(),
        train_set,
        store,
        k=3,
        progress=False,
    )
    assert teacher_identity(distilled) != identity
    assert not run_or_reuse(distilled, progress=False).reused


def test_a_checkpoint_is_known_by_its_weights(tmp_path):
    # The same weights saved again (another history and wall time in the file) keep their identity:
    # a teacher or pretraining retrained bit for bit in a fresh clone is the committed rows' one.
    spec = _spec(tmp_path)
    run_or_reuse(spec, progress=False)
    last = spec.run_dir / "last.pt"
    identity = checkpoint_identity(last)
    checkpoint = torch.load(last, weights_only=True)
    again = tmp_path / "again.pt"
    torch.save(dict(checkpoint, history=[{"epoch": 1, "epoch_time_s": 123.0}]), again)
    assert again.read_bytes() != last.read_bytes() and checkpoint_identity(again) == identity
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(dict(checkpoint, model=changed), again)
    assert checkpoint_identity(again) != identity
    for name in ("weights.safetensors", "released.pth"):  # not a checkpoint of a run: known by its bytes
        other = tmp_path / name
        other.write_bytes(b"not a checkpoint of a run")
        assert checkpoint_identity(other) == experiment.file_sha256(other)
    assert checkpoint_identity(tmp_path / "missing.pt") is None and checkpoint_identity(None) is None


def test_a_data_folder_inside_the_project_is_named_relative_to_it(tmp_path, monkeypatch):
    # Notebook 06's image folder lives under the project's build/: a fresh clone elsewhere is the same run.
    spec = _spec(tmp_path)
    here = replace(spec, data=replace(spec.data, root=str(experiment.project_root() / "build" / "images")))
    digest = spec_digest(here)
    monkeypatch.setattr(experiment, "project_root", lambda: tmp_path / "clone")
    clone = replace(spec, data=replace(spec.data, root=str(tmp_path / "clone" / "build" / "images")))
    assert spec_digest(clone) == digest
    elsewhere = replace(spec, data=replace(spec.data, root=str(tmp_path / "images")))  # outside: its own path
    assert spec_digest(elsewhere) != digest


def test_a_moved_project_reuses_its_runs(tmp_path):
    # Runs and the store they were distilled from move together (a renamed or copied project folder):
    # the paths change, the content does not, so nothing is retrained.
    spec = _spec(tmp_path / "before", augment="none")
    train_set = training_set(spec.data)
    teacher = build_model("resnet18", num_classes=train_set.num_classes, img_size=32).eval()
    precompute(teacher, train_set, tmp_path / "before" / "store", k=3, progress=False)
    distilled = replace(
        spec, name="kd", logits_path=str(tmp_path / "before" / "store"), train=replace(spec.train, alpha=0.5)
    )
    assert not run_or_reuse(distilled, progress=False).reused
    digest = run_digest(distilled.run_dir)
    (tmp_path / "before").rename(tmp_path / "after")
    moved = replace(
        distilled, output_dir=str(tmp_path / "after" / "runs"), logits_path=str(tmp_path / "after" / "store")
    )
    again = run_or_reuse(moved, progress=False)
    assert again.reused and run_digest(moved.run_dir) == digest


def test_results_log_keeps_one_row_per_key_across_restarts(tmp_path):
    path = tmp_path / "results" / "sweep.jsonl"
    log = ResultsLog(path)
    log.add("a", dict(top1=1.0))
    log.add("b", dict(top1=2.0))
    reopened = ResultsLog(path)
    assert "a" in reopened and reopened.rows["b"]["top1"] == 2.0
    reopened.add("a", dict(top1=3.0))  # recomputed: replaces its row, in place, without a duplicate line
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["key"], r["top1"]) for r in lines] == [("a", 3.0), ("b", 2.0)]
    assert ResultsLog(path).rows == reopened.rows
    reopened.retain(["b", "gone"])  # a finished sweep keeps its own points only
    assert list(ResultsLog(path).rows) == ["b"]
    assert not list(path.parent.glob("*.tmp"))


def test_a_sweep_point_is_reused_only_while_its_digest_matches_the_run(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    measured = []
    measure = experiment.measure

    def counted(*args, **kwargs):
        measured.append(args[0].name)
        return measure(*args, **kwargs)

    monkeypatch.setattr(experiment, "measure", counted)
    results = ResultsLog(tmp_path / "sweep.jsonl")
    row = sweep_point(results, "grid/T=2", spec, temperature=2.0)
    assert row["temperature"] == 2.0 and row["run"] == "run" and row["run_digest"] == run_digest(spec.run_dir)
    assert set(row) == {
        "key",
        "temperature",
        "val_top1",
        "val_top5",
        "test_top1",
        "test_top5",
        "seconds",
        "run",
        "run_digest",
        "spec_digest",
        "teacher_identity",
        "init_identity",
        "autocast",
        "history",
    }
    assert row["autocast"] == autocast_identity(spec)  # as the run's config.json says it trained
    assert [r["epoch"] for r in row["history"]] == [1] and "top1" in row["history"][0]
    assert row["test_top1"] is None  # a sweep point's row never reads the test set
    # Same run on disk: the logged row comes back as it is, from a fresh log too; nothing is measured.
    assert sweep_point(ResultsLog(tmp_path / "sweep.jsonl"), "grid/T=2", spec, temperature=2.0) == row
    assert len(measured) == 1
    # The run is retrained with other weights in the same folder: the row is measured again and replaced.
    changed = replace(spec, train=replace(spec.train, lr=5e-3))
    again = sweep_point(results, "grid/T=2", changed, temperature=2.0)
    assert len(measured) == 2 and again["run_digest"] != row["run_digest"]
    assert ResultsLog(tmp_path / "sweep.jsonl").rows == {"grid/T=2": again}
    # A row from another clone (another digest) is not trusted either.
    results.add("grid/T=2", dict(again, run_digest="0" * 16, val_top1=99.0))
    assert sweep_point(results, "grid/T=2", changed, temperature=2.0) == again
    assert len(measured) == 3


def test_a_row_stands_for_its_run_when_the_run_is_not_on_disk_and_only_then(tmp_path, monkeypatch):
    """A fresh clone has the committed results but no runs/: its notebooks redraw from the rows."""
    spec = _spec(tmp_path)
    spec = replace(spec, data=replace(spec.data, val_per_class=2))  # a carved validation set: test numbers allowed
    results = ResultsLog(tmp_path / "rows.jsonl")
    row = sweep_point(results, "a", spec, test=True, condition="labels only", seed=0)
    shutil.rmtree(spec.run_dir)  # the clone without runs/
    trained = []
    monkeypatch.setattr(experiment, "run_or_reuse", lambda *a, **k: trained.append(a[0].name))
    reopened = ResultsLog(tmp_path / "rows.jsonl")
    assert sweep_point(reopened, "a", spec, test=True) == row and reopened.reused == ["a"] and not trained
    # a row logged before one of its coordinates was recorded gains it when reused, in the file too
    reopened.add("a", {k: v for k, v in row.items() if k != "seed"})
    assert sweep_point(reopened, "a", spec, test=True, seed=0) == row and not trained
    assert ResultsLog(tmp_path / "rows.jsonl").rows["a"] == row
    # another spec (one more epoch) is not this row's run, and neither is a row without test numbers
    assert reusable_row(reopened, "a", replace(spec, train=replace(spec.train, epochs=2))) is None
    reopened.add("a", dict(row, test_top1=None))
    assert reusable_row(reopened, "a", spec, test=True) is None and reusable_row(reopened, "a", spec) is not None
    # a row made from another teacher than the one on disk is not reused; where no teacher is on disk, it is
    teacher = tmp_path / "teacher.pt"
    distilled = replace(
        spec, teacher_model="resnet18", teacher_checkpoint=str(teacher), train=replace(spec.train, alpha=1.0)
    )
    reopened.add("b", dict(row, spec_digest=spec_digest(distilled), teacher_identity="f" * 64))
    assert reusable_row(reopened, "b", distilled) is not None
    teacher.write_bytes(b"another teacher")
    assert reusable_row(reopened, "b", distilled) is None


def test_a_row_trained_in_another_precision_is_reused_and_said_to_be(tmp_path):
    """A clone on a CPU without native bf16 trains in fp32: it still redraws from rows a bf16 machine
    made, and says how many of those it reused (a row that does not say how it trained counts too)."""
    spec = _spec(tmp_path)
    results = ResultsLog(tmp_path / "rows.jsonl")
    row = sweep_point(results, "a", spec, condition="labels only", seed=0)
    shutil.rmtree(spec.run_dir)
    here = autocast_identity(spec)
    other = "bfloat16" if here == "float32" else "float32"
    results.add("b", dict(row, autocast=other))
    results.add("c", {k: v for k, v in row.items() if k != "autocast"})
    reopened = ResultsLog(tmp_path / "rows.jsonl")
    assert reopened.reuse_note() is None
    for key in ("a", "b", "c"):
        assert sweep_point(reopened, key, spec) == reopened.rows[key]
    assert reopened.reused == ["a", "b", "c"] and reopened.reused_elsewhere == {"b": (other, here), "c": (None, here)}
    note = reopened.reuse_note()
    assert note.startswith("3 run(s) not on disk") and f"1 in {other}, 1 in an unrecorded precision" in note
    assert f"this machine trains in {here}" in note
    # a run that fixes its precision (amp off) is judged by that, whatever this machine's default
    assert autocast_identity(replace(spec, train=replace(spec.train, amp=False))) == "float32"


def test_the_seed_fixes_the_initial_weights_whatever_the_callers_rng(tmp_path):
    spec = _spec(tmp_path)
    torch.manual_seed(123)
    first = prepare_run(spec).model.state_dict()
    torch.manual_seed(456)
    state = torch.get_rng_state()
    again = prepare_run(spec).model.state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = prepare_run(replace(spec, train=replace(spec.train, seed=1))).model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_last_checkpoint_that_is_not_a_run_is_retrained_not_a_crash(tmp_path):
    spec = _spec(tmp_path)
    spec.run_dir.mkdir(parents=True)
    torch.save([torch.zeros(1)], spec.run_dir / "last.pt")  # a file in the run's place that is not a run
    result = run_or_reuse(spec, progress=False)
    assert not result.reused and len(result.history) == 1


def test_a_student_whose_data_differs_from_its_store_is_refused_before_its_data_loads(tmp_path, monkeypatch):
    import pytest

    from tinyvit_lib import data
    from tinyvit_lib.logit_store import LogitStore, StoreMismatch

    spec = _spec(tmp_path)
    spec = replace(spec, data=replace(spec.data, val_per_class=2))
    written = training_set(spec.data)
    teacher = build_model("resnet18", num_classes=written.num_classes, img_size=32).eval()
    store = tmp_path / "store"
    precompute(teacher, written, store, k=3, mode="replay", epochs=1, spec=spec.data, progress=False)
    assert LogitStore.open(store).header.data == spec.data.for_store()  # the header records the spec
    student = replace(spec, name="kd", logits_path=str(store), train=replace(spec.train, alpha=1.0))
    assert prepare_run(student).teacher is not None  # the spec it was written from reads it

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the store was checked")

    monkeypatch.setattr(data, "build", no_loading)
    other = replace(student, data=replace(spec.data, data_seed=1, augment="full"))
    with pytest.raises(StoreMismatch, match=r"augment: store 'light', run 'full'; data_seed: store 0, run 1"):
        prepare_run(other)
    # A subset of the store's images reads it only when the store covers the whole pool.
    with pytest.raises(StoreMismatch, match=r"max_per_class: store 4, run 3"):
        prepare_run(replace(student, data=replace(spec.data, max_per_class=3)))


def test_a_results_file_with_a_cut_last_line_is_read_without_it_and_repaired(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps(dict(key="a", top1=1.0)) + "\n" + json.dumps(dict(key="b", top1=2.0)) + "\n" + '{"key": "c", "to'
    )
    with pytest.warns(UserWarning, match="last line was cut off"):
        results = ResultsLog(path)
    assert list(results.rows) == ["a", "b"]
    results.add("c", dict(top1=3.0))  # the cut line is gone from the file, not glued to the new row
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"key": "a"}\n{broken\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2, is not a results row"):
        ResultsLog(path)
    path.write_text('{"key": "a"}\n{"top1": 1.0}\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2, is not a results row: it has no key"):
        ResultsLog(path)


def test_an_append_that_fails_midway_is_repaired_by_the_next_row(tmp_path, monkeypatch):
    """A full disk mid-append leaves part of a line; the next row must not be glued to it."""
    path = tmp_path / "rows.jsonl"
    results = ResultsLog(path)
    results.add("a", dict(top1=1.0))

    class FullDisk:
        def __init__(self, *args):
            self.file = open(*args)  # noqa: SIM115

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:9])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(experiment, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        results.add("b", dict(top1=2.0))
    monkeypatch.undo()
    results.add("c", dict(top1=3.0))
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_a_row_reads_as_one_line():
    """sweep_point prints a new row as a sentence a learner reads, not a dict."""
    row = dict(val_top1=74.05, val_top5=97.9, test_top1=None, test_top5=None, seconds=15.24, run="r")
    expected = "labels only/seed=0: val top-1 74.05 (top-5 97.90); trained 15.2 s (run r)"
    assert row_line("labels only/seed=0", row) == expected
    line = row_line("k", dict(row, test_top1=74.18, test_top5=97.81))
    assert ", test top-1 74.18 (top-5 97.81);" in line and "{" not in line


def test_init_notes_say_what_starting_from_a_file_did_without_training(tmp_path):
    """A reused fine-tuning run still says that its head was replaced (notebook 06 prints it)."""
    spec = _spec(tmp_path)
    assert init_notes(spec) == []
    weights = tmp_path / "thousand_classes.pth"
    torch.save(build_model("tinyvit_5m", num_classes=1000, in_chans=3, img_size=224).state_dict(), weights)
    notes = init_notes(replace(spec, init_from=str(weights)))
    assert any(note.startswith("head replaced") for note in notes), notes
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_a_finished_run_on_disk_is_kept_and_said_to_be(tmp_path):
    """Re-running a notebook retrains nothing and says so: the run on disk is kept, its row returned."""
    spec = _spec(tmp_path)
    first = ResultsLog(tmp_path / "rows.jsonl")
    row = sweep_point(first, "a", spec, condition="labels only", seed=0)
    assert first.reuse_note() is None  # it trained
    again = ResultsLog(tmp_path / "rows.jsonl")
    assert sweep_point(again, "a", spec) == row
    assert again.kept == ["a"] and again.reused == []
    assert again.reuse_note().startswith("1 run(s) found finished on disk, not retrained (")
