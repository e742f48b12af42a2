"""`python -m tinyvit_lib.train`: train a TinyViT (or a teacher) from the command line.

    python -m tinyvit_lib.train --dataset cifar100 --train-data ./data --name tinyvit_5m_baseline
    python -m tinyvit_lib.train --dataset cifar100 --train-data ./data --name tinyvit_5m_distill \\
        --use-distillation --logits-path ./logits/cifar100_logits.pkl --distill-alpha 0.5 --distill-temp 1.0
    python -m tinyvit_lib.train --name kd --use-distillation --logits-path logits/fm --alpha 1 --temperature 2
    torchrun --nproc_per_node=2 -m tinyvit_lib.train ...     # data parallel, one process per GPU/CPU share

A thin layer over `tinyvit_lib.experiment`: bad values print one line on stderr and exit with
status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from .augment import AUGMENT_PRESETS, MIX_PRESETS
from .data import CHECK_IMAGES, DATASETS, DataSpec
from .distill import ALPHA, TEMPERATURE
from .experiment import RunSpec, check_resumable, prepare_run, refuse_if_running, run
from .trainer import TrainConfig, read_log
from .utils import HelpFormatter, LockHeld


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyvit_lib.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    _data_arguments(p)
    _model_arguments(p)
    _optimisation_arguments(p)
    _distillation_arguments(p)
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    data.add_argument(
        "--train-data",
        "--data-root",
        dest="data_root",
        default=None,
        help="dataset root (default: Debian's Fashion-MNIST, or ~/.cache/tinyvit_lib for downloads)",
    )
    data.add_argument("--img-size", type=int, default=None, help="resolution (default: the dataset's, 32 or 224)")
    data.add_argument("--augment", default="light", choices=sorted(AUGMENT_PRESETS))
    data.add_argument(
        "--mix",
        nargs="?",
        const="full",
        default=None,
        choices=sorted(MIX_PRESETS),
        help="mix each view with a partner's: full (Mixup 0.8 or CutMix 1.0, what --mix alone means) or "
        "function-matching (Mixup, coefficient uniform in [0, 1])",
    )
    data.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        help="train on the first N images of each class (a deterministic subset)",
    )
    data.add_argument("--max-val-per-class", type=int, default=None)
    data.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="carve validation from the training split: this many images per class, by permanent ID, never "
        "trained on (default: validate on the held-out split)",
    )
    data.add_argument("--init-from", default=None, help="start from this checkpoint's weights (fine-tuning)")
    data.add_argument("--num-workers", type=int, default=0)
    data.add_argument(
        "--no-verify-files",
        dest="verify_files",
        action="store_false",
        help="cifar100: use a copy whose md5 differs from the official release (md5 checked: %(default)s)",
    )
    data.add_argument(
        "--check-images",
        choices=CHECK_IMAGES,
        default="header",
        help="image folders: check every file when the data is loaded (header: cheap; decode: thorough)",
    )


def _model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default="tinyvit_5m",
        help="tinyvit_5m, tinyvit_11m, tinyvit_21m, a torchvision classifier (e.g. resnet18) or timm:<name>",
    )
    model.add_argument("--name", required=True, help="run name: the run folder is OUTPUT_DIR/NAME")
    model.add_argument("--output-dir", default="runs")
    model.add_argument("--resume", action="store_true", help="continue OUTPUT_DIR/NAME/last.pt exactly")
    model.add_argument(
        "--overwrite", action="store_true", help="train afresh in a run folder that already holds a run's checkpoint"
    )


def _optimisation_arguments(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument_group("optimisation")
    defaults = TrainConfig()
    opt.add_argument("--epochs", type=int, default=defaults.epochs)
    opt.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    opt.add_argument("--lr", type=float, default=defaults.lr)
    opt.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help=f"final learning rate (default: {defaults.min_lr:g}, or --lr if lower)",
    )
    opt.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    opt.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    opt.add_argument("--clip-grad", type=float, default=defaults.clip_grad)
    opt.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and drop path")
    opt.add_argument(
        "--data-seed",
        type=int,
        default=DataSpec.data_seed,
        help="data order, views and mixing partners (a replay store's --data-seed)",
    )
    opt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    opt.add_argument(
        "--amp",
        choices=["auto", "on", "off"],
        default="auto",
        help="autocast (auto: CUDA, and a CPU with native bf16)",
    )
    opt.add_argument(
        "--amp-dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="float16 for GPUs without bf16 (adds loss scaling)",
    )
    opt.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (graphs cached in ~/.cache/tinyvit_lib/inductor)",
    )
    opt.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep weights and inputs in NCHW memory (channels-last is faster for convolutions)",
    )
    opt.add_argument("--no-fused-adamw", dest="fused_adamw", action="store_false", help="the plain AdamW loop")
    opt.add_argument("--checkpoint-every", type=int, default=0, help="also save last.pt every N steps")


def _distillation_arguments(p: argparse.ArgumentParser) -> None:
    kd = p.add_argument_group("distillation")
    kd.add_argument("--use-distillation", action="store_true")
    kd.add_argument("--logits-path", default=None, help="a logit store made by tinyvit_lib.precompute_logits")
    kd.add_argument("--teacher-model", default=None, help="online distillation: the teacher's architecture")
    kd.add_argument("--teacher-checkpoint", default=None, help="weights for --teacher-model")
    kd.add_argument(
        "--alpha",
        "--distill-alpha",
        dest="alpha",
        type=float,
        default=None,
        help=f"weight of the teacher's term (default {ALPHA}; the course's recipe is 1.0)",
    )
    kd.add_argument(
        "--temperature",
        "--distill-temp",
        dest="temperature",
        type=float,
        default=None,
        help=f"distillation T (default {TEMPERATURE:g})",
    )


def _min_lr(args: argparse.Namespace) -> float:
    """--min-lr, or by default TrainConfig's, lowered to --lr if that is lower (a bad --lr is left
    for TrainConfig to name)."""
    if args.min_lr is not None:
        return args.min_lr
    return min(TrainConfig.min_lr, args.lr) if args.lr > 0 else 0.0


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """Turn parsed arguments into a `RunSpec`. Values are checked by `TrainConfig` and `RunSpec`.

    Raises:
        ValueError: as `_check_distillation_flags`, or a bad value (from `TrainConfig`/`RunSpec`).
    """
    _check_distillation_flags(args)
    return RunSpec(
        name=args.name,
        data=_data_spec(args),
        model=args.model,
        init_from=args.init_from,
        teacher_model=args.teacher_model,
        teacher_checkpoint=args.teacher_checkpoint,
        logits_path=args.logits_path,
        output_dir=args.output_dir,
        train=_train_config(args),
    )


def _check_distillation_flags(args: argparse.Namespace) -> None:
    """Raises ValueError: a distillation flag without the other (--use-distillation without a
    teacher; a teacher, --alpha or --temperature without --use-distillation), or --alpha 0 with it
    (which leaves the teacher out)."""
    if args.use_distillation and not (args.logits_path or args.teacher_model):
        raise ValueError("--use-distillation needs --logits-path (stored logits) or --teacher-model (online)")
    if args.use_distillation and args.alpha == 0:
        raise ValueError("--alpha 0 leaves the teacher's term out: train without --use-distillation")
    flags = {"--logits-path": args.logits_path, "--teacher-model": args.teacher_model}
    flags |= {"--alpha": args.alpha, "--temperature": args.temperature}
    given = [flag for flag, value in flags.items() if value is not None]
    if given and not args.use_distillation:
        raise ValueError(f"{'/'.join(given)} apply only with --use-distillation (a teacher's term)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The optimisation flags as a `TrainConfig` (alpha and T default to the library's)."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=_min_lr(args),
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad,
        alpha=ALPHA if args.alpha is None else args.alpha,
        temperature=TEMPERATURE if args.temperature is None else args.temperature,
        seed=args.seed,
        device=args.device,
        amp={"auto": None, "on": True, "off": False}[args.amp],
        amp_dtype=args.amp_dtype,
        compile=args.compile,
        channels_last=args.channels_last,
        fused_adamw=args.fused_adamw,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
    )


def _data_spec(args: argparse.Namespace) -> DataSpec:
    """The data flags as a `DataSpec`."""
    return DataSpec(
        dataset=args.dataset,
        root=args.data_root,
        img_size=args.img_size,
        augment=args.augment,
        mix=args.mix,
        max_per_class=args.max_per_class,
        max_val_per_class=args.max_val_per_class,
        val_per_class=args.val_per_class,
        data_seed=args.data_seed,
        verify_files=args.verify_files,
        check_images=args.check_images,
    )


def refuse_to_replace(spec: RunSpec, *, overwrite: bool) -> None:
    """Raises LockHeld: another process is training this run (said first: it is why the folder holds
    a checkpoint). ValueError: the run folder already holds a run's checkpoint and `overwrite` is not
    set (a command run again would otherwise train afresh over a finished run)."""
    refuse_if_running(spec)
    last = spec.run_dir / "last.pt"
    if last.is_file() and not overwrite:
        done = len(read_log(spec.run_dir))
        raise ValueError(
            f"{spec.run_dir} already holds a run ({last}, {done} epoch(s) logged): --resume continues it, "
            "--overwrite trains afresh over it, or choose another --name"
        )


def where_it_stands(spec: RunSpec, checkpoint: dict) -> str:
    """One line on the run a resume continues (its `checkpoint`): epochs done of the schedule,
    batches into the next."""
    into = f", {checkpoint['batch']} batch(es) into epoch {checkpoint['epoch'] + 1}" if checkpoint["batch"] else ""
    return f"resuming {spec.run_dir}: {checkpoint['epoch']} of {spec.train.epochs} epoch(s) done{into}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]). Returns the exit status: 0 done; 2 bad input or a
    run folder in use by another process (one line on stderr, nothing written); 1 a run that failed
    on its way (a full disk, a NaN loss: one line, and last.pt holds the last epoch saved)."""
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.resume:
            checkpoint = check_resumable(spec)  # the same data, model, optimisation and teacher, before anything loads
            if os.environ.get("RANK", "0") == "0":
                print(where_it_stands(spec, checkpoint))
        else:
            refuse_to_replace(spec, overwrite=args.overwrite)
        prepared = prepare_run(spec)  # every input checked before the run folder is created
        if spec.teacher_model and not spec.teacher_checkpoint and os.environ.get("RANK", "0") == "0":
            print("warning: no --teacher-checkpoint: the online teacher is randomly initialised", file=sys.stderr)
        result = run(prepared, resume=args.resume)
    except (ValueError, FileNotFoundError, LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as exc:  # e.g. a full disk: last.pt holds the last epoch saved
        print(f"error: {exc}", file=sys.stderr)
        return 1
    final = result.final
    print(
        f"{spec.run_dir}: {len(result.history)} epochs, final top-1 {final.get('top1', float('nan')):.2f}%, "
        f"best top-1 {result.best_top1:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
