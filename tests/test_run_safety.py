"""One writer per run, a resume that continues only the same run, and one line (never a traceback)
when the training CLI cannot go on: bad floats, an output folder it cannot write, a replay store too
short for the run, a full disk."""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_cli import TRAIN, assert_refused, run_cases

from tinyvit_lib import tinyvit_5m
from tinyvit_lib.augment import AUGMENT_PRESETS
from tinyvit_lib.data import get_dataset, per_class_subset
from tinyvit_lib.distill import precompute, precompute_or_reuse
from tinyvit_lib.logit_store import writer_lock
from tinyvit_lib.model import load_pretrained
from tinyvit_lib.teachers import build_model
from tinyvit_lib.utils import LockHeld

TINY_RUN = ["--dataset", "synthetic", "--max-per-class", "2", "--max-val-per-class", "2", "--batch-size", "8"]


def train_cli(*argv: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", TRAIN, *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@contextmanager
def tmpfs(path: Path, *options: str):
    """A small tmpfs at `path` (root on Linux only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_second_process_training_the_same_run_is_refused(tmp_path):
    args = [*TINY_RUN, "--max-per-class", "40", "--epochs", "50", "--output-dir", "runs", "--name", "x"]
    first = train_cli(*args, cwd=tmp_path)
    lock, log = tmp_path / "runs" / "x" / ".lock", tmp_path / "runs" / "x" / "log.jsonl"

    def logged_an_epoch() -> bool:  # holds the lock, and its log has a record the others must not cut
        return f"process {first.pid} " in (lock.read_text() if lock.exists() else "") and (
            log.exists() and log.read_text().strip() != ""
        )

    try:
        deadline = time.time() + 120
        while not logged_an_epoch() and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        log_before = log.read_text()
        assert log_before.strip(), "the first run logged no epoch in 120 s"
        second = train_cli(*args, cwd=tmp_path)
        resuming = train_cli(*args, "--resume", "--lr", "0.5", cwd=tmp_path)  # told who runs it, not what differs
        errors = [process.communicate(timeout=300)[1] for process in (second, resuming)]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for process, err in zip((second, resuming), errors):
        assert process.returncode == 2 and f"in use by process {first.pid}" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert log.read_text().startswith(log_before)  # not truncated


def test_resume_refuses_another_run_naming_the_fields_and_changes_nothing(tmp_path):
    common = [*TINY_RUN, "--epochs", "1", "--output-dir", str(tmp_path / "runs"), "--name", "r"]
    (done,) = run_cases([common], tmp_path)
    assert done[0] == 0, done
    run_dir = tmp_path / "runs" / "r"
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}  # the lock names its last holder
    cases = {
        "max_per_class: run 2, asked 1": ["--max-per-class", "1"],
        "train.lr: run 0.001, asked 0.002": ["--lr", "0.002"],
        "model: run 'tinyvit_5m', asked 'tinyvit_11m'": ["--model", "tinyvit_11m"],
    }
    results = run_cases([[*common, "--resume", *argv] for argv in cases.values()], tmp_path)
    for message, result in zip(cases, results):
        assert_refused(result, message)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == files

    (same,) = run_cases([[*common, "--resume"]], tmp_path)  # a finished run: said, nothing left to train
    assert same[0] == 0 and f"resuming {run_dir}: 1 of 1 epoch(s) done" in same[1], same
    last = run_dir / "last.pt"
    last.write_bytes(files["last.pt"][: len(files["last.pt"]) // 2])
    (truncated,) = run_cases([[*common, "--resume"]], tmp_path)
    assert_refused(truncated, f"cannot read checkpoint {last}")


def test_infinite_floats_are_refused(tmp_path):
    common = [*TINY_RUN, "--output-dir", str(tmp_path / "runs"), "--name", "x"]
    distill = ["--use-distillation", "--teacher-model", "resnet18"]
    results = run_cases([[*common, "--lr", "inf"], [*common, *distill, "--distill-temp", "inf"]], tmp_path)
    assert_refused(results[0], "lr=inf")
    assert_refused(results[1], "temperature=inf")
    assert not (tmp_path / "runs").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    (result,) = run_cases([[*TINY_RUN, "--output-dir", str(tmp_path / "a_file" / "runs"), "--name", "x"]], tmp_path)
    assert_refused(result, "is a file, not a folder")
    with tmpfs(tmp_path / "ro", "ro", "size=64k") as read_only:
        (result,) = run_cases([[*TINY_RUN, "--output-dir", str(read_only / "runs"), "--name", "x"]], tmp_path)
        assert_refused(result, "is read-only")


def test_a_full_disk_stops_with_one_line_and_leaves_no_temporary_file(tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as small:
        (result,) = run_cases([[*TINY_RUN, "--epochs", "1", "--output-dir", str(small), "--name", "x"]], tmp_path)
        code, _, err = result
        assert code == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
        run_dir = small / "x"
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json", "log.jsonl"]
        assert (run_dir / "log.jsonl").read_text() == ""  # no record of the epoch whose checkpoint failed


def test_load_pretrained_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list.pt holds a list, not a state dict of tensors"):
        load_pretrained(tinyvit_5m(), path)


def test_a_run_longer_than_its_replay_store_is_refused_before_anything_is_written(tmp_path):
    views = per_class_subset(get_dataset("synthetic", split="train", augment=AUGMENT_PRESETS["light"]), 2)
    teacher = build_model("resnet18", num_classes=10, img_size=32)
    precompute(teacher, views, tmp_path / "store", k=3, mode="replay", epochs=1, progress=False)
    common = [*TINY_RUN, "--output-dir", str(tmp_path / "runs"), "--name", "x", "--use-distillation"]
    (result,) = run_cases([[*common, "--logits-path", str(tmp_path / "store"), "--epochs", "2"]], tmp_path)
    assert_refused(result, "the replay store holds 1 epoch(s) of views, the run trains 2")
    assert not (tmp_path / "runs").exists()


def test_a_store_being_written_is_not_removed_to_be_rebuilt(tmp_path):
    dataset = get_dataset("synthetic", split="train", num_samples=40)
    teacher = build_model("resnet18", num_classes=10, img_size=32)
    precompute(teacher, dataset, tmp_path / "store", k=3, progress=False)
    with writer_lock(tmp_path / "store"), pytest.raises(LockHeld, match="is in use by process"):
        precompute_or_reuse(teacher, dataset, tmp_path / "store", k=3, force=True, progress=False)
    assert (tmp_path / "store" / "manifest.json").exists()


def test_bad_data_arguments_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty_store").mkdir()
    common = ["--output-dir", str(tmp_path / "runs"), "--name", "x"]
    cases = {
        "img_size=10000 is outside [16, 1024]": [*TINY_RUN, "--img-size", "10000"],
        str(tmp_path / "nope"): ["--dataset", "fashion-mnist", "--train-data", str(tmp_path / "nope")],
        "the folder is empty": [*TINY_RUN, "--use-distillation", "--logits-path", str(tmp_path / "empty_store")],
    }
    results = run_cases([[*common, *argv] for argv in cases.values()], tmp_path)
    for message, result in zip(cases, results):
        assert_refused(result, message)
    assert not (tmp_path / "runs").exists()
