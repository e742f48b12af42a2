"""Does the trainer's speed policy change what a student learns? The default profile's baseline and
replay-store students, every seed, trained and evaluated in fp32 eager (NCHW weights, the plain AdamW
loop, no autocast) and under the default policy (channels-last weights and inputs, fused AdamW, bf16
autocast for training and evaluation where the CPU has it natively, evaluation BatchNorm-folded),
from one replay store.

    python scripts/compare_policies.py --store logits/default/replay --out results/default/policy_check.json

Writes one row per run (policy, condition, seed, validation and test top-1, epoch times) and prints
the differences paired by seed: on validation (where the policy is chosen) and on test (reported).
The store is notebook 02's (any replay store of the default profile's student data).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tinyvit_lib.experiment import evaluate_run, run_or_reuse, validation_set
from tinyvit_lib.experiment import test_set as final_test_set
from tinyvit_lib.profiles import distillation_runs, resolve_profile
from tinyvit_lib.stats import describe_gain, paired_gain
from tinyvit_lib.utils import atomic_write_text

POLICIES = {"fp32 eager": dict(channels_last=False, fused_adamw=False, amp=False), "default": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="the replay store the distilled students read")
    p.add_argument("--runs", type=Path, default=Path("runs/policy_check"), help="where the runs go")
    p.add_argument("--out", type=Path, required=True, help="the rows, as JSON")
    args = p.parse_args()
    P = resolve_profile("default")
    rows, sets = [], {}
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
                sets = sets or dict(val=validation_set(spec), test=final_test_set(spec))
                top1 = {
                    f"{split}_top1": round(evaluate_run(spec.run_dir, data, amp=spec.train.amp)["top1"], 2)
                    for split, data in sets.items()
                }
                rows.append(
                    dict(
                        policy=policy,
                        condition=condition,
                        seed=seed,
                        **top1,
                        epoch_time_s=[r["epoch_time_s"] for r in result.history],
                    )
                )
                print(rows[-1], flush=True)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    eager, fast = POLICIES
    for condition in ("baseline", "replay store"):
        by_policy = [dict(r, condition=r["policy"]) for r in rows if r["condition"] == condition]
        for metric in ("val_top1", "test_top1"):
            gain = paired_gain(by_policy, fast, eager, metric)
            print(f"{condition}, {metric}: {fast} - {eager} = {describe_gain(gain)}, per seed {gain['per_seed']}")


if __name__ == "__main__":
    main()
