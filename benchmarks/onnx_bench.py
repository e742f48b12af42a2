"""`make bench`, section "onnx": the exported TinyViT-5M in onnxruntime beside PyTorch eager.

For each size (32 with batch 256, 224 with batch 64; `--quick`: 32 alone, batch 4) the model is exported
with `tinyvit_lib.export.save_onnx` (which checks onnxruntime against PyTorch on the batch) and both
are timed on the same batch in turns: images/s, median of the samples, in fp32 (onnxruntime's CPU
provider runs fp32; PyTorch eager runs the model as `evaluate` does, BatchNorm folded and channels-last,
in fp32 too, and under the inference policy's autocast where the CPU has native bf16).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tinyvit_lib import inference_copy, tinyvit_5m
from tinyvit_lib.export import save_onnx
from tinyvit_lib.utils import cpu_has_native_bf16

CASES = ((32, 256), (224, 64))
Timer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]  # steps -> median seconds per step


def onnx_row(img_size: int, batch: int, folder: Path, *, timer: Timer) -> dict:
    """Export TinyViT-5M at `img_size` and time it on one batch, in turns: PyTorch fp32 as `evaluate` runs
    it (`inference_copy`: BatchNorm folded, channels-last; and under bf16 autocast where the CPU has it
    natively) against onnxruntime fp32, by `timer` (the bench's `time_in_turns`); images/s and the largest
    logit difference."""
    import onnxruntime

    model = tinyvit_5m(img_size=img_size, num_classes=1000).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    path = folder / f"tinyvit_5m_{img_size}.onnx"
    gap = save_onnx(model, path, x)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    runner, x_last = inference_copy(model), x.contiguous(memory_format=torch.channels_last)

    def eager(autocast: bool = False) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            runner(x_last)

    steps = {"torch_fp32": eager, "onnxruntime_fp32": lambda: session.run(None, feed)}
    if cpu_has_native_bf16():
        steps["torch_bf16"] = lambda: eager(True)
    rates = {name: batch / seconds for name, seconds in timer(steps).items()}
    return dict(img_size=img_size, batch=batch, max_abs_logit_diff=gap, **rates)


def onnx_section(*, quick: bool, timer: Timer) -> list[dict]:
    """One row per size (`CASES`; with `quick`, 32 alone at batch 4: each export takes seconds), printed as
    it is measured."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinyvit-onnx-bench-") as tmp:
        for img_size, batch in CASES[:1] if quick else CASES:
            row = onnx_row(img_size, 4 if quick else batch, Path(tmp), timer=timer)
            rows.append(row)
            extra = f", torch bf16 {row['torch_bf16']:,.1f}" if "torch_bf16" in row else ""
            print(
                f"onnx {img_size:>3} batch {row['batch']:>3}: torch fp32 {row['torch_fp32']:,.1f} images/s, "
                f"onnxruntime fp32 {row['onnxruntime_fp32']:,.1f} ({row['onnxruntime_fp32'] / row['torch_fp32']:.2f}x)"
                f"{extra}; max |logit diff| {row['max_abs_logit_diff']:.1e}",
                flush=True,
            )
    return rows
