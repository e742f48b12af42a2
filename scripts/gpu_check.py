"""A few minutes on a CUDA machine: the course's pipeline at GPU settings, measured.

    python scripts/gpu_check.py          (or: make gpu-check)

It needs no installed package beyond PyTorch, torchvision, timm, NumPy and Pillow: the repository's
root is put on the import path, so a machine's own Python runs it from a checkout.

On CIFAR-100-format data it makes on the spot (random pixels in the official `cifar-100-python`
layout, which is Python pickles: the format's, written to a temporary folder and read by torchvision;
this project writes no pickle of its own), it runs the `cifar100` profile's teacher for one epoch,
writes a replay store of its logits, trains one TinyViT-5M student from the store, then the same
student with two processes through `torchrun` (both on GPU 0 when it is the only one). For each it
prints images/s, the precision policy the trainer chose and the peak GPU memory. The accuracies mean
nothing (random pixels); the speeds and the policy are what it checks.

On a machine without CUDA it refuses in one line (exit 2).
"""

from __future__ import annotations

import json
import os
import pickle  # the CIFAR-100 format's own serialisation, for the throwaway copy below
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .` (a GPU machine's own Python)

from tinyvit_lib.data import training_set  # noqa: E402 - after the path above
from tinyvit_lib.distill import precompute  # noqa: E402 - after the path above
from tinyvit_lib.experiment import load_trained, run  # noqa: E402 - after the path above
from tinyvit_lib.profiles import resolve_profile, run_spec  # noqa: E402 - after the path above

TRAIN_IMAGES, TEST_IMAGES = 10_000, 1_000
TORCHRUN_TIMEOUT_S = 300


def write_cifar100(root: Path, rng: np.random.Generator) -> Path:
    """Random images in the official CIFAR-100 layout under `root` (its md5 differs from the release)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        entry = {
            "filenames": [f"{split}_{i}.png" for i in range(count)],
            "batch_label": split,
            "fine_labels": [int(label) for label in rng.integers(0, 100, count)],
            "coarse_labels": [int(label) for label in rng.integers(0, 20, count)],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"class{k}" for k in range(100)],
        "coarse_label_names": [f"group{k}" for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def report(what: str, history: list[dict], run_dir: Path | None) -> None:
    """One line: images/s of the last epoch, the policy the trainer chose, the peak GPU memory."""
    policy = json.loads((run_dir / "config.json").read_text())["policy"] if run_dir else {}
    rate = history[-1].get("images_per_s") if history else None
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{what:<34} {rate or float('nan'):>10,.0f} images/s   peak {peak:5.2f} GiB   policy {policy}", flush=True)
    torch.cuda.reset_peak_memory_stats()


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_cifar100(tmp / "data", np.random.default_rng(0))
        P = replace(resolve_profile("cifar100"), data_root=str(root), out_dir=str(tmp / "out"))
        no_md5 = dict(verify_files=False)  # a throwaway copy, not the official release

        teacher = run_spec(P, "teacher", role="teacher", epochs=1)
        teacher = replace(teacher, data=replace(teacher.data, **no_md5))
        result = run(teacher, progress=False)
        report("teacher (resnet18, 1 epoch)", result.history, teacher.run_dir)

        student = run_spec(P, "student", epochs=2)
        student = replace(student, data=replace(student.data, **no_md5))
        views = training_set(student.data)
        t0 = time.perf_counter()
        store, stats = precompute(
            load_trained(teacher.run_dir / "best.pt"),
            views,
            tmp / "store",
            k=P.k,
            mode="replay",
            epochs=2,
            device="cuda",
            progress=False,
            spec=student.data,
        )
        seconds = time.perf_counter() - t0
        print(f"{'replay store (2 epochs of views)':<34} {stats.images_per_s:>10,.0f} images/s   ({seconds:.1f} s)")
        torch.cuda.reset_peak_memory_stats()

        distilled = replace(student, logits_path=str(tmp / "store"), train=replace(student.train, alpha=1.0))
        result = run(distilled, progress=False)
        report("student (TinyViT-5M, from the store)", result.history, distilled.run_dir)

        world = 2
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "tinyvit_lib.train",
            "--dataset",
            "cifar100",
            "--train-data",
            str(root),
            "--no-verify-files",
            "--output-dir",
            str(tmp / "ddp"),
            "--name",
            "student_ddp",
            "--epochs",
            "1",
            "--batch-size",
            str(P.student.batch_size // world),
            "--use-distillation",
            "--logits-path",
            str(tmp / "store"),
            "--max-per-class",
            str(P.student.max_per_class),
            "--val-per-class",
            str(P.val_per_class),
        ]
        paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, OMP_NUM_THREADS="4", PYTHONPATH=os.pathsep.join(filter(None, paths)))
        t0 = time.perf_counter()
        try:  # a stuck rendezvous would otherwise wait out gloo's 30-minute timeout
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, cwd=REPO, timeout=TORCHRUN_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as stuck:
            print(f"torchrun, {world} processes: no end in {TORCHRUN_TIMEOUT_S} s", file=sys.stderr)
            print(_tail(stuck.stdout), _tail(stuck.stderr), sep="\n", file=sys.stderr)
            return 1
        if done.returncode != 0:
            print(f"torchrun, {world} processes: failed ({done.returncode})", file=sys.stderr)
            print(_tail(done.stdout), _tail(done.stderr), sep="\n", file=sys.stderr)
            return 1
        run_dir = tmp / "ddp" / "student_ddp"
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        seconds, rate = time.perf_counter() - t0, log[-1]["images_per_s"]
        policy = json.loads((run_dir / "config.json").read_text())["policy"]
        backend = "NCCL" if torch.cuda.device_count() >= world else "gloo: processes share a GPU; not a DDP speed"
        print(
            f"{'student, torchrun x' + str(world):<34} {rate:>10,.0f} images/s   "
            f"({seconds:.0f} s with start-up; {backend})   policy {policy}"
        )
    return 0


def _tail(text: str | bytes | None, chars: int = 8000) -> str:
    """The end of a child's output (torchrun's own summary alone can fill 2,000 characters)."""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text or ""
    return text[-chars:]


if __name__ == "__main__":
    sys.exit(main())
