"""Does computing tiny-map depthwise convolutions as mixing matrices (`model.small_map_depthwise`,
the fp32 CPU path of `ConvBN`) change what a student learns? The default profile's labels-only
student, every seed, trained and evaluated in fp32 with oneDNN's convolution on those maps and with
the mixing matrices; the two differ only in rounding. Run it where training is fp32 (an AVX2-only
CPU, or `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 one); elsewhere autocast
keeps its own rule and the two conditions would be the same.

    python scripts/compare_small_map.py --out results/default/small_map_check.json

Writes one row per run (kernels, seed, validation top-1, epoch times) and prints the difference
paired by seed on validation, with its 95% t-interval.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from tinyvit_lib.experiment import evaluate_run, paired_gain, run_or_reuse, validation_set
from tinyvit_lib.model import ConvBN
from tinyvit_lib.profiles import distillation_runs, resolve_profile
from tinyvit_lib.utils import atomic_write_text, cpu_has_native_bf16

T_95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}  # two-sided 95% t multipliers for n seeds (n - 1 dof)
KERNELS = {"oneDNN": False, "mixing matrices": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/small_map_check"), help="where the runs go")
    p.add_argument("--out", type=Path, required=True, help="the rows, as JSON")
    args = p.parse_args()
    if cpu_has_native_bf16():
        raise SystemExit("this CPU trains in bf16 by default: cap it at AVX2 (see the docstring) to compare fp32 paths")
    P = resolve_profile("default")
    rows = []
    for kernels, on in KERNELS.items():
        ConvBN.small_map_products = on
        for seed in P.seeds:
            spec = distillation_runs(P, seed)["baseline"]
            spec = replace(spec, output_dir=str(args.runs / kernels.replace(" ", "_")))
            result = run_or_reuse(spec, progress=False)
            top1 = round(evaluate_run(spec.run_dir, validation_set(spec), amp=False)["top1"], 2)
            rows.append(
                dict(
                    condition=kernels,
                    seed=seed,
                    val_top1=top1,
                    epoch_time_s=[r["epoch_time_s"] for r in result.history],
                    isa=torch.backends.cpu.get_cpu_capability(),
                )
            )
            print(rows[-1], flush=True)
    ConvBN.small_map_products = True
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    gain = paired_gain(rows, "mixing matrices", "oneDNN", "val_top1")
    n = len(gain["per_seed"])
    half = T_95[n] * gain["se"] if gain["se"] is not None else float("nan")
    print(
        f"validation top-1, mixing matrices - oneDNN: {gain['mean']:+.2f} +- {half:.2f} (95% t-interval, "
        f"t = {T_95[n]} at {n} seeds; resolved: {abs(gain['mean']) > half}) per seed {gain['per_seed']}"
    )


if __name__ == "__main__":
    main()
