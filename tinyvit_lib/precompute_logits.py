"""`python -m tinyvit_lib.precompute_logits`: run a teacher once and store its top-k logits.

    python -m tinyvit_lib.precompute_logits --dataset cifar100 --teacher-model resnet50 --k 10 \\
        --output-path ./logits/cifar100
    python -m tinyvit_lib.precompute_logits --dataset fashion-mnist --teacher-model resnet18 \\
        --teacher-checkpoint runs/teacher/best.pt --k 10 --mode replay --epochs 10 --output-path logits/fm
    torchrun --nproc_per_node=2 -m tinyvit_lib.precompute_logits ...      # sharded: one share per rank
    python -m tinyvit_lib.precompute_logits ... --verify                   # check the store, made now or before
    python -m tinyvit_lib.precompute_logits --inspect logits/fm           # what a store holds

The output path names a store folder (manifest + binary records), never a pickle, whatever its
suffix. Run the same command again after an interruption: it continues where it stopped.

`--verify` re-runs the teacher on `--verify-samples` records (each view replayed from its stored
seed) and compares with the tolerance `distill.VerifyTolerance` sets. On a path that already holds a
complete store it writes nothing: it opens the store (checksums, and the same teacher, data and
settings as the command line describes) and checks it. `--inspect PATH` prints what a store holds
and checks its files, without a teacher or data.

One precompute per output path at a time: a second one on the same path (or on any rank it shares
with a running sharded one) is refused, naming the process that holds it.

Exit status: 0 done (and verified, with --verify; for --inspect, a store whose files all check out);
1 the verification found differences beyond the tolerance, or the precompute failed on its way (a
full disk: one line; run the command again to continue); 2 bad input, an output path that cannot be
written (a file, read-only) or is in use by another precompute, or (--inspect) no store or a store
with a bad file: one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .augment import AUGMENT_PRESETS, MIX_PRESETS
from .data import CHECK_IMAGES, DATASETS, DatasetWithIDs, DataSpec, training_set
from .distill import TOP_K, describe_verify, precompute, store_header, verify_store
from .logit_store import MANIFEST, LogitStore, StoreHeader, describe_store, official_record_bytes
from .teachers import build_model, load_weights
from .trainer import pick_device
from .utils import HelpFormatter, LockHeld, init_distributed, is_main_process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyvit_lib.precompute_logits",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    _data_arguments(p)
    _store_arguments(p)
    _run_arguments(p)
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-root", "--train-data", dest="data_root", default=None)
    p.add_argument(
        "--no-verify-files",
        dest="verify_files",
        action="store_false",
        help="cifar100: use a copy whose md5 differs from the official release (md5 checked: %(default)s)",
    )
    p.add_argument(
        "--check-images",
        choices=CHECK_IMAGES,
        default="header",
        help="image folders: check every file when the data is loaded (header: cheap; decode: thorough)",
    )


def _store_arguments(p: argparse.ArgumentParser) -> None:
    """The teacher, and what the store keeps: k, the mode, the replayed views."""
    p.add_argument(
        "--teacher-model",
        default=None,
        help="a torchvision classifier name, timm:<name> or a TinyViT preset (required unless --inspect)",
    )
    p.add_argument("--teacher-checkpoint", default=None, help="the teacher's weights (without: random weights)")
    p.add_argument(
        "--k", type=int, default=None, help="logits kept per image, 1..classes (default: 10, or the classes if fewer)"
    )
    p.add_argument("--output-path", default=None, help="the store folder (required unless --inspect)")
    p.add_argument(
        "--mode",
        choices=["static", "replay"],
        default=None,
        help="static: one record per image (evaluation view); replay: one per image and epoch (default: static; "
        "--verify of an existing store: the store's)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="replay mode: epochs of augmented views to store (default: 1; --verify of an existing store: the store's)",
    )
    p.add_argument(
        "--augment",
        default=None,
        choices=[a for a in AUGMENT_PRESETS if a != "none"],
        help="replay mode: the augmentation the student will train with (default: light)",
    )
    p.add_argument(
        "--mix",
        nargs="?",
        const="full",
        default=None,
        choices=sorted(MIX_PRESETS),
        help="replay mode: store views mixed in pairs, as `train --mix` makes them: full (Mixup 0.8 or CutMix 1.0, "
        "what --mix alone means) or function-matching (Mixup, coefficient uniform in [0, 1])",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help=f"replay mode: the seed of the views and mixing partners (the student's --data-seed; default "
        f"{DataSpec.data_seed})",
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """Size, subset, device, and the store checks (--verify, --inspect)."""
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-per-class", type=int, default=None, help="a deterministic per-class subset")
    p.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="leave out the validation carve of this many images per class (as the student's --val-per-class)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-run the teacher on a sample of records and compare (a complete store is checked, "
        "not rewritten); exit status 1 beyond the tolerance",
    )
    p.add_argument("--verify-samples", type=int, default=256)
    p.add_argument(
        "--inspect",
        metavar="PATH",
        default=None,
        help="print what the store at PATH holds and check its files (needs no other option)",
    )


def fill_from_store(args: argparse.Namespace, header: StoreHeader) -> None:
    """--verify of an existing store: what the command line leaves unsaid (the mode, epochs, k and the
    data flags the store records) is taken from the store's header, so that checking a store needs
    only its path, its teacher and its data; a flag that is given is compared with the store."""
    recorded = dict(header.data or {}, mode=header.mode, epochs=header.epochs, k=header.k)
    for name in ("mode", "epochs", "k", "img_size", "max_per_class", "val_per_class", "augment", "mix", "data_seed"):
        if name in ("augment", "mix", "data_seed") and args.mode != "replay":
            continue  # the views a replay store records; a static one (or --mode static) holds the eval view
        if getattr(args, name) is None and recorded.get(name) is not None:
            setattr(args, name, recorded[name])


def data_spec(args: argparse.Namespace) -> DataSpec:
    """The data the store covers, as the student's spec names it: the evaluation view (static) or the
    student's augmentation from `--data-seed` (replay), mixed with `--mix`, without the
    `--val-per-class` carve, cut to `--max-per-class`.

    Raises:
        ValueError: --mix, --augment or --data-seed without --mode replay (a static store holds the
            evaluation view, which they do not change), or a bad value (from `DataSpec`).
    """
    if args.mode != "replay":
        given = [f"--{n.replace('_', '-')}" for n in ("mix", "augment", "data_seed") if getattr(args, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} describe augmented views: use them with --mode replay")
    return DataSpec(
        dataset=args.dataset,
        root=args.data_root,
        img_size=args.img_size,
        augment=(args.augment or "light") if args.mode == "replay" else "none",
        mix=args.mix,
        max_per_class=args.max_per_class,
        val_per_class=args.val_per_class,
        data_seed=DataSpec.data_seed if args.data_seed is None else args.data_seed,
        verify_files=args.verify_files,
        check_images=args.check_images,
    )


def load_teacher(args: argparse.Namespace, dataset: DatasetWithIDs) -> nn.Module:
    """`--teacher-model` for the data's classes, channels and resolution, with `--teacher-checkpoint`
    loaded (see `build_model` and `load_weights` for what is raised). Built from seed 0, so that a
    teacher without a checkpoint is the same in every process and run (a resumed precompute, --verify)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = build_model(
            args.teacher_model,
            num_classes=dataset.num_classes,
            in_chans=dataset.out_chans,
            img_size=dataset.transform.img_size,
        )
    return load_weights(teacher, args.teacher_checkpoint) if args.teacher_checkpoint else teacher


def print_description(path: str) -> int:
    """Print `describe_store(path)`; 0 for a good store, 2 (one line on stderr) if a file is bad.

    Raises:
        FileNotFoundError, ValueError: no store at `path`, or an unreadable manifest.
    """
    info = describe_store(path)
    teacher, data = info["teacher"], info["dataset"]
    print(f"logit store {info['path']} ({info['format']} v{info['version']})")
    print(
        f"  teacher  {teacher.get('name')}, {teacher.get('parameters', 0):,} parameters, "
        f"weights sha256 {str(teacher.get('weights_sha256'))[:16]}"
    )
    print(
        f"  dataset  {data.get('name')}, split {data.get('split')}, {data.get('size')} images, "
        f"{info['num_classes']} classes, ids sha256 {str(data.get('ids_sha256'))[:16]}, "
        f"content sha256 {str(data.get('content_sha256'))[:16]}"
    )
    print(f"  view     {info['img_size']}x{info['img_size']}, {info['transform']}")
    if info.get("data"):
        print("  spec     " + ", ".join(f"{name}={value!r}" for name, value in info["data"].items()))
    print(
        f"  records  {info['mode']}, k={info['k']}, {info['epochs']} epoch(s), data seed {info['data_seed']}: "
        f"{info['records']} records of {info['bytes_per_record']} bytes "
        f"(official format: {info['official_bytes_per_record']})"
    )
    print(f"  layout   {info['layout']}")
    for f in info["files"]:
        size = "missing" if f["bytes"] is None else f"{f['bytes']:,} bytes"
        print(f"  file     {f['name']}, {size}, {'checksum ok' if f['problem'] is None else 'BAD'}")
    problems = [f["problem"] for f in info["files"] if f["problem"]]
    if problems:
        more = f" (and {len(problems) - 1} more bad file(s))" if len(problems) > 1 else ""
        print(f"error: {problems[0]}{more}", file=sys.stderr)
        return 2
    return 0


def run_precompute(
    args: argparse.Namespace, teacher: nn.Module, spec: DataSpec, dataset: DatasetWithIDs, device: torch.device
) -> None:
    """Write (or finish) the store at `--output-path`, in the process group `torchrun` describes,
    and print a summary on rank 0 (see `precompute` for what is raised)."""
    init_distributed(device)
    store, stats = precompute(
        teacher,
        dataset,
        args.output_path,
        k=args.k,
        mode=args.mode,
        epochs=args.epochs,
        teacher_name=args.teacher_model,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        spec=spec,
    )
    if is_main_process():
        print(
            f"{store.path}: {store.header.size} images x {store.header.epochs} epoch(s), "
            f"{store.bytes_per_record} bytes per record (official format: {official_record_bytes(args.k)}); "
            f"{stats.images} images this run at {stats.images_per_s:.0f} images/s"
        )
        if not args.teacher_checkpoint:
            print(
                "warning: no --teacher-checkpoint: the store holds a randomly initialised teacher's logits",
                file=sys.stderr,
            )


def run_verify(
    store: LogitStore, teacher: nn.Module, dataset: DatasetWithIDs, args: argparse.Namespace, device: torch.device
) -> int:
    """Print `verify_store`'s numbers and tolerances; 0 within the tolerance, 1 beyond it."""
    report = verify_store(store, teacher, dataset, samples=args.verify_samples, device=device)
    print(f"verify: {describe_verify(report)}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]); returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.inspect:
            return print_description(args.inspect)
        missing = [
            flag
            for flag, value in (("--teacher-model", args.teacher_model), ("--output-path", args.output_path))
            if value is None
        ]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required (only --inspect PATH goes without)")
        if args.verify and args.verify_samples < 1:  # refused before the store is written
            raise ValueError(f"--verify-samples={args.verify_samples} must be >= 1")
        existing = args.verify and (Path(args.output_path) / MANIFEST).is_file()  # check it, write nothing
        if existing:
            fill_from_store(args, LogitStore.open(args.output_path, verify=False).header)
        args.mode, args.epochs = args.mode or "static", 1 if args.epochs is None else args.epochs
        spec = data_spec(args)
        dataset = training_set(spec)
        if args.k is None:
            args.k = min(TOP_K, dataset.num_classes)
        teacher = load_teacher(args, dataset)
        device = pick_device(args.device)
        if existing:
            expected = store_header(
                teacher, args.teacher_model, dataset, k=args.k, mode=args.mode, epochs=args.epochs, spec=spec
            )
            store = LogitStore.open(args.output_path, expect=expected)
            return run_verify(store, teacher, dataset, args, device)
        run_precompute(args, teacher, spec, dataset, device)
        if args.verify and is_main_process():
            return run_verify(LogitStore.open(args.output_path), teacher, dataset, args, device)
    except (ValueError, FileNotFoundError, FileExistsError, LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk: the complete batches are kept, a re-run continues
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
