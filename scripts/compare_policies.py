"""Does the trainer's speed policy change what a student learns? The default profile's baseline and
replay-store students, every seed, trained and tested in fp32 eager (NCHW weights, the plain AdamW
loop, no autocast) and under the default policy (channels-last weights and inputs, fused AdamW,
evaluation BatchNorm-folded and in bf16 where the CPU has it natively), from one replay store.

    python scripts/compare_policies.py --store logits/default/replay --out results/default/policy_check.json

Writes one row per run (policy, condition, seed, test top-1, epoch times) and prints the gains paired
by seed. The store is notebook 02's (any replay store of the default profile's student data).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from tinyvit_lib import get_dataset
from tinyvit_lib.experiment import evaluate_run, run_or_reuse
from tinyvit_lib.profiles import distillation_runs, resolve_profile
from tinyvit_lib.utils import atomic_write_text

POLICIES = {"fp32 eager": dict(channels_last=False, fused_adamw=False, amp=False), "default": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="the replay store the distilled students read")
    p.add_argument("--runs", type=Path, default=Path("runs/policy_check"), help="where the runs go")
    p.add_argument("--out", type=Path, required=True, help="the rows, as JSON")
    args = p.parse_args()
    P = resolve_profile("default")
    test_set = get_dataset(P.dataset, P.data_root, "test", img_size=P.img_size)
    rows = []
    for policy, changes in POLICIES.items():
        for seed in P.seeds:
            for condition in ("baseline", "replay store"):
                spec = distillation_runs(P, seed)[condition]
                spec = replace(
                    spec,
                    output_dir=str(args.runs / ("eager" if changes else "fast")),
                    logits_path=str(args.store) if spec.logits_path else None,
                    train=replace(spec.train, **changes),
                )
                result = run_or_reuse(spec, progress=False)
                top1 = round(evaluate_run(spec.run_dir, test_set, amp=spec.train.amp)["top1"], 2)
                rows.append(
                    dict(
                        policy=policy,
                        condition=condition,
                        seed=seed,
                        top1=top1,
                        epoch_time_s=[r["epoch_time_s"] for r in result.history],
                    )
                )
                print(rows[-1], flush=True)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    eager, fast = POLICIES
    for condition in ("baseline", "replay store"):
        top1 = {(r["policy"], r["seed"]): r["top1"] for r in rows if r["condition"] == condition}
        diffs = [top1[fast, s] - top1[eager, s] for s in P.seeds]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        print(f"{condition}: {fast} - {eager} = {statistics.mean(diffs):+.3f} (s.e. {se:.3f}) per seed {diffs}")


if __name__ == "__main__":
    main()
