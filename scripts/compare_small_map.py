"""Does computing convolutions on small maps as matrix products change what a model learns? In
fp32 on a CPU, `ConvBN` computes a depthwise convolution on a map of at most 4 pixels as mixing
matrices (`model.small_map_depthwise`) and a 1x1 one on a map of at most 16 pixels as one product
(`model.pointwise_conv`: both the student's), and `SmallMapConv2d` a 2x2 map's convolution as
one product (`model.small_map_conv`) and a 3x3 one on a 4x4 or 8x8 map by Winograd's F(4x4, 3x3)
(`model.winograd_conv3x3`: the teacher). Each model, every seed of the default profile, is trained
and evaluated in fp32 with oneDNN's convolution on those maps and with the products (the teacher
also with the products and Winograd); the conditions differ only in rounding. The student is the
labels-only baseline; the teacher is notebook 02's ResNet-18 on 1,000 images per class of the pool
(not all 5,500, to keep the check short). Run it where training is fp32 (an AVX2-only CPU, or
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` on an AVX-512
one); elsewhere autocast keeps oneDNN's kernels and the conditions are the same.

    python scripts/compare_small_map.py --out results/default/small_map_check.json

Writes one row per run (model, kernels, seed, validation top-1, epoch times) and prints, per model,
the difference paired by seed on validation, with its 95% t-interval.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from tinyvit_lib.experiment import evaluate_run, run_or_reuse, validation_set
from tinyvit_lib.model import ConvBN, SmallMapConv2d
from tinyvit_lib.profiles import distillation_runs, resolve_profile, teacher_spec
from tinyvit_lib.stats import describe_gain, paired_gain
from tinyvit_lib.utils import atomic_write_text, cpu_has_native_bf16

# Per model, each condition's (small_map_products, winograd) switches.
CONDITIONS = {
    "student": {"oneDNN": (False, False), "products": (True, False)},
    "teacher": {"oneDNN": (False, False), "products": (True, False), "products+Winograd": (True, True)},
}
COMPARED = {"student": [("products", "oneDNN")], "teacher": [("products", "oneDNN"), ("products+Winograd", "products")]}


def use_kernels(small_map_products: bool, winograd: bool) -> None:
    """Switch every model's small-map paths (class attributes, read at each forward pass)."""
    ConvBN.small_map_products = SmallMapConv2d.small_map_products = small_map_products
    SmallMapConv2d.winograd = winograd


TEACHER_IMAGES_PER_CLASS = 1000


def spec_for(P, model: str, seed: int, runs: Path, kernels: str):
    """The run of `model` ("student" or "teacher") for `seed` with `kernels`, in its own folder."""
    if model == "student":
        spec = distillation_runs(P, seed)["baseline"]
    else:
        spec = teacher_spec(P)
        spec = replace(
            spec,
            name=f"{spec.name}-seed{seed}",
            data=replace(spec.data, max_per_class=TEACHER_IMAGES_PER_CLASS),
            train=replace(spec.train, seed=seed),
        )
    return replace(spec, output_dir=str(runs / model / kernels.replace("+", "_")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/small_map_check"), help="where the runs go")
    p.add_argument("--out", type=Path, required=True, help="the rows, as JSON")
    args = p.parse_args()
    if cpu_has_native_bf16():
        raise SystemExit("this CPU trains in bf16 by default: cap it at AVX2 (see the docstring) to compare fp32 paths")
    P = resolve_profile("default")
    rows = []
    for model, conditions in CONDITIONS.items():
        for kernels, switches in conditions.items():
            use_kernels(*switches)
            for seed in P.seeds:
                spec = spec_for(P, model, seed, args.runs, kernels)
                result = run_or_reuse(spec, progress=False)
                top1 = round(evaluate_run(spec.run_dir, validation_set(spec), amp=False)["top1"], 2)
                row = dict(model=model, condition=kernels, seed=seed, val_top1=top1)
                row.update(epoch_time_s=[r["epoch_time_s"] for r in result.history])
                rows.append(dict(row, isa=torch.backends.cpu.get_cpu_capability()))
                print(rows[-1], flush=True)
    use_kernels(True, True)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    for model, pairs in COMPARED.items():
        for new, old in pairs:
            gain = paired_gain([r for r in rows if r["model"] == model], new, old, "val_top1")
            print(f"{model}, validation top-1, {new} - {old}: {describe_gain(gain)}, per seed {gain['per_seed']}")


if __name__ == "__main__":
    main()
