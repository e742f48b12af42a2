"""Where a training step's time goes (`make bench`, section "profile").

For each model and size (the TinyViT-5M student and the ResNet-18 teacher, at 32x32 and 224x224)
the step of the trainer's default policy (channels-last, fused AdamW, bf16 autocast where the CPU
has it natively) is timed, its FLOP rate put against the matmul peak of its precision measured in
the same run, and its operators timed one by one: a `TorchDispatchMode` reads the clock around
every ATen call of the step (forward, backward and optimizer), grouped by operator and the shapes
of its first two tensor arguments.

Why not torch.profiler: on this project's 2-core CPUs its per-operator times of elementwise kernels
came out several times what the same calls take without it, and the sum exceeded the step; the
clock around each call adds a few microseconds per call instead, and the table says how much of
the step its rows account for. On a GPU, kernels run asynchronously and the clock around a call
measures its launch, so the table is CPU only (the FLOP rate is reported on any device).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CASES = (("tinyvit_5m", 32, 128), ("tinyvit_5m", 224, 32), ("resnet18", 32, 128), ("resnet18", 224, 32))


class OpTimer(TorchDispatchMode):
    """Wall seconds and calls of every ATen operator called under it, by (operator, shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:2]
        key = (func.overloadpacket.__name__, ", ".join(str(list(s)) for s in shapes))
        self.seconds[key] += time.perf_counter() - t0
        self.calls[key] += 1
        return out


def op_table(step: Callable[[], None], step_s: float, *, steps: int = 2, rows: int = 12) -> tuple[str, float]:
    """The top `rows` operators of `step` by wall time per step, as text, and the share of the step
    (`step_s`, timed without the timer) that all of the operators account for."""
    timer = OpTimer()
    with timer:
        for _ in range(steps):
            step()
    total = sum(timer.seconds.values()) / steps
    lines = [f"    {'ms/step':>8} {'of step':>8} {'calls':>6}  operator  (shapes of the first two tensors)"]
    for key, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1])[:rows]:
        ms = 1000 * seconds / steps
        lines.append(f"    {ms:>8.1f} {ms / 1000 / step_s:>8.0%} {timer.calls[key] // steps:>6}  {key[0]}  ({key[1]})")
    return "\n".join(lines), total / step_s


def profile_section(
    *, device: torch.device, peaks: dict[str, float], quick: bool, make_step, flops_per_image, default_policy
) -> list[dict]:
    """One row (and table) per `CASES` entry, printed as measured. `make_step`, `flops_per_image`
    and `default_policy` are the bench's (passed in, so that this module does not import it)."""
    from tinyvit_lib.teachers import build_model

    rows = []
    for name, img_size, batch in (CASES[:1] + CASES[2:3]) if quick else CASES:
        batch = 8 if quick else batch
        torch.manual_seed(0)
        model = build_model(name, num_classes=1000, img_size=img_size)
        flops = flops_per_image(model, "train", img_size) * batch
        step = make_step(model, "train", default_policy, img_size, batch, device)
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        runs = 1 if quick or img_size > 32 else 5
        for _ in range(runs):
            step()
        step_s = (time.perf_counter() - t0) / runs
        bf16 = default_policy.bf16("train", device)
        peak = peaks["bf16" if bf16 else "fp32"]
        row = dict(
            model=name,
            img_size=img_size,
            batch=batch,
            bf16=bf16,
            images_per_s=batch / step_s,
            gflops_per_s=flops / step_s / 1e9,
            fraction_of_peak=flops / step_s / peak,
        )
        print(
            f"{name} at {img_size}x{img_size}, batch {batch}, training step ({'bf16' if bf16 else 'fp32'}): "
            f"{1000 * step_s:.1f} ms, {row['images_per_s']:.1f} images/s, {row['gflops_per_s']:.1f} GFLOP/s = "
            f"{row['fraction_of_peak']:.0%} of the {'bf16' if bf16 else 'fp32'} matmul peak"
        )
        if device.type == "cpu":
            table, covered = op_table(step, step_s, steps=1 if img_size > 32 else 2)
            row.update(table=table, operators_share_of_step=covered)
            print(f"  where it goes (the operators below and the rest sum to {covered:.0%} of the step):\n{table}")
        rows.append(row)
    return rows
