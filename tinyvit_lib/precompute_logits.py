"""`python -m tinyvit_lib.precompute_logits`: run a teacher once and store its top-k logits.

    python -m tinyvit_lib.precompute_logits --dataset cifar100 --teacher-model resnet50 --k 10 \\
        --output-path ./logits/cifar100_logits.pkl
    python -m tinyvit_lib.precompute_logits --dataset fashion-mnist --teacher-model resnet18 \\
        --teacher-checkpoint runs/teacher/best.pt --k 10 --mode replay --epochs 10 --output-path logits/fm
    torchrun --nproc_per_node=2 -m tinyvit_lib.precompute_logits ...      # sharded: one share per rank

The output path names a store folder (manifest + binary records), never a pickle, whatever its
suffix. Run the same command again after an interruption: it continues where it stopped.
Bad values print one line on stderr and exit with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from .augment import AUGMENT_PRESETS
from .data import DATASETS, get_dataset, per_class_subset
from .distill import precompute, verify_store
from .logit_store import LogitStore, StoreMismatch
from .teachers import build_model, load_weights
from .trainer import pick_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyvit_lib.precompute_logits", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-root", "--train-data", dest="data_root", default=None)
    p.add_argument("--teacher-model", required=True, help="a torchvision classifier name or a TinyViT preset")
    p.add_argument("--teacher-checkpoint", default=None, help="the teacher's weights (without: random weights)")
    p.add_argument("--k", type=int, default=10, help="logits kept per image (1..classes)")
    p.add_argument("--output-path", required=True, help="the store folder")
    p.add_argument("--mode", choices=["static", "replay"], default="static",
                   help="static: one record per image (evaluation view); replay: one per image and epoch")
    p.add_argument("--epochs", type=int, default=1, help="replay mode: epochs of augmented views to store")
    p.add_argument("--augment", default="light", choices=[a for a in AUGMENT_PRESETS if a != "none"],
                   help="replay mode: the augmentation the student will train with")
    p.add_argument("--seed", type=int, default=0, help="replay mode: the base seed of the augmentation")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-per-class", type=int, default=None, help="a deterministic per-class subset")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="re-run the teacher on a sample of records and report the largest error")
    p.add_argument("--verify-samples", type=int, default=256)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or args.epochs < 1 or args.num_workers < 0:
            raise ValueError(f"--batch-size ({args.batch_size}) and --epochs ({args.epochs}) must be >= 1, "
                             f"--num-workers ({args.num_workers}) >= 0")
        if args.mode == "static" and args.epochs != 1:
            raise ValueError(f"--epochs={args.epochs}: a static store holds one record per image; use --mode replay")
        augment = AUGMENT_PRESETS[args.augment] if args.mode == "replay" else None
        dataset = get_dataset(args.dataset, args.data_root, "train", img_size=args.img_size, augment=augment,
                              base_seed=args.seed)
        if args.max_per_class is not None:
            dataset = per_class_subset(dataset, args.max_per_class)
        if not 1 <= args.k <= dataset.num_classes:
            raise ValueError(f"--k={args.k} must be between 1 and the class count {dataset.num_classes}")
        device = pick_device(args.device)
        in_chans = dataset.out_chans  # the teacher is built for the data's channels, as in training
        teacher = build_model(args.teacher_model, num_classes=dataset.num_classes, in_chans=in_chans,
                              img_size=dataset.transform.img_size)
        if args.teacher_checkpoint:
            load_weights(teacher, args.teacher_checkpoint)
        else:
            print("warning: no --teacher-checkpoint: the teacher has random weights", file=sys.stderr)
        if os.path.isdir(args.output_path) and os.path.exists(os.path.join(args.output_path, "manifest.json")):
            raise FileExistsError(f"{args.output_path} already holds a complete logit store")
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        store, stats = precompute(teacher, dataset, args.output_path, k=args.k, mode=args.mode, epochs=args.epochs,
                                  teacher_name=args.teacher_model, batch_size=args.batch_size, device=device,
                                  in_chans=in_chans, num_workers=args.num_workers)
    except StoreMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{store.path}: {store.header.size} images x {store.header.epochs} epoch(s), "
              f"{store.bytes_per_record} bytes per record (official format: {4 + 4 * args.k}); "
              f"{stats.images} images this run at {stats.images_per_s:.0f} images/s")
        if args.verify:
            report = verify_store(LogitStore.open(args.output_path), teacher, dataset, samples=args.verify_samples,
                                  in_chans=in_chans, device=device)
            print(f"verify: {report['records']} records, largest value error {report['max_value_error']:.4g}, "
                  f"index mismatch rate {report['index_mismatch_rate']:.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
