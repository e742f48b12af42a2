"""One training loop for the teacher, the baseline student and the distilled students.

`train` runs AdamW with a linear-warmup cosine schedule, label smoothing, gradient clipping and
(optionally) distillation from a teacher, in one process or under `torchrun` (DDP). Each run owns
a folder `runs/<name>/` holding `config.json`, `log.jsonl` (one record per epoch), `last.pt` and
`best.pt`. Checkpoints are written atomically and hold everything needed to continue exactly:
model, optimizer, schedule, gradient scaler, epoch, step, the RNG state, the config. A run killed at any point and
resumed from `last.pt` ends with the same weights as one that never stopped (on the CPU, with the
same seed): the data order and every augmentation are functions of (seed, epoch, sample), and the
only other randomness (drop path) comes from the saved generator state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import DatasetWithIDs, EpochShuffleSampler
from .distill import ALPHA, TEMPERATURE, DistillationLoss, Teacher
from .model import inference_copy
from .utils import (
    FileLock,
    all_reduce_sum,
    atomic_write_text,
    autocast_by_default,
    cpu_has_native_bf16,
    init_distributed,
    is_main_process,
    keep_freed_memory,
    load_checkpoint,
    rank_world,
    save_checkpoint,
)
from .utils import progress as progress_bar

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainParts",
    "TrainState",
    "train",
    "train_one_epoch",
    "train_step",
    "CheckpointSaver",
    "evaluate",
    "pick_device",
    "training_autocast",
    "compile_cache_dir",
    "param_groups",
    "CosineSchedule",
    "read_log",
    "history_table",
    "saved_config",
]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run. `batch_size` is per process; the global batch is
    batch_size x world size. Learning rates are for the global batch as given (no implicit scaling).

    Raises:
        ValueError: a value out of range (named in the message), e.g. a warm-up longer than the run.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 5.0  # max gradient norm; 0 turns clipping off
    alpha: float = ALPHA  # weight of the teacher's term, used when the run has a teacher (`DistillationLoss`)
    temperature: float = TEMPERATURE  # distillation temperature T, used when the run has a teacher
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), or any torch device string
    # autocast; None: on for CUDA, and on a CPU with native bf16 (`utils.autocast_by_default`), off elsewhere
    amp: bool | None = None
    amp_dtype: str = "bfloat16"  # or "float16" (GPUs without bf16): then a GradScaler scales the loss
    compile: bool = False
    # The speed policy (`make bench` measures it; docs/performance.md): weights and inputs channels-last
    # (oneDNN's convolutions prefer it), and a fused AdamW update.
    channels_last: bool = True
    fused_adamw: bool = True  # on CPU and CUDA; other devices use the plain loop
    num_workers: int = 0
    checkpoint_every: int = 0  # also save last.pt every this many steps (0: at epoch ends only)
    eval_every: int = 1  # validate after every this many epochs, and always after the last

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "min_lr": 0 <= self.min_lr and (self.min_lr <= self.lr or not 0 < self.lr < math.inf),  # lr's own fault
            "warmup_epochs": 0 <= self.warmup_epochs <= self.epochs,  # longer, the rate would never reach lr
            "seed": 0 <= self.seed < 2**63,  # torch.manual_seed's range
            "weight_decay": self.weight_decay >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "clip_grad": self.clip_grad >= 0,
            "alpha": 0 <= self.alpha <= 1,
            "temperature": self.temperature > 0,
            "num_workers": self.num_workers >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "eval_every": self.eval_every >= 1,
            "amp_dtype": self.amp_dtype in ("bfloat16", "float16"),
        }
        floats = ("lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "temperature")
        bad = [name for name, ok in checks.items() if not ok]
        bad += [name for name in floats if name not in bad and not math.isfinite(getattr(self, name))]
        if bad:
            raise ValueError("invalid training config: " + ", ".join(f"{n}={getattr(self, n)}" for n in bad))


def saved_config(saved: dict) -> dict:
    """A checkpoint's training config with the fields it predates filled in with their defaults: a run
    saved before a field existed ran as that field's default does (e.g. `eval_every` = 1)."""
    if not saved:
        return saved
    return {f.name: f.default for f in fields(TrainConfig)} | saved


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_top1: float = 0.0
    reused: bool = False  # read back from a finished run (`experiment.run_or_reuse`), not trained now

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------- pieces


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" picks CUDA, then Apple's MPS, then the CPU; anything else is passed to torch.device.
    CUDA without an index ("auto" or "cuda") is this process's GPU under torchrun: LOCAL_RANK's
    (more processes than GPUs, as in a check on one GPU, share them in turn).

    Raises:
        ValueError: an unknown device string, or CUDA/MPS asked for where there is none.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        return pick_device("auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here")
    return device


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and kernels; not norms, biases or attention-bias tables."""
    skip = getattr(model, "no_weight_decay_keywords", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in name for k in skip) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class CosineSchedule:
    """Per-step learning rate: linear warmup from 0 to `lr`, then cosine down to `min_lr`."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int
    ) -> None:
        self.optimizer, self.lr, self.min_lr = optimizer, lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return dict(
            step_count=self.step_count,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (`log.jsonl`), oldest first."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


HISTORY_COLUMNS = (  # (record field, heading, format) of `history_table`, in order
    ("epoch", "epoch", "{:d}"),
    ("step", "steps", "{:,d}"),
    ("lr", "lr", "{:.2e}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("val_loss", "val loss", "{:.3f}"),
    ("top1", "val top-1 %", "{:.2f}"),
    ("images_per_s", "images/s", "{:,.0f}"),
    ("epoch_time_s", "seconds", "{:.1f}"),
)


def history_table(history: list[dict]) -> str:
    """A run's per-epoch records as a small text table (one line per epoch; a field the record lacks,
    such as validation on an epoch that did not validate, is "-")."""
    columns = [(key, head, fmt) for key, head, fmt in HISTORY_COLUMNS if any(key in r for r in history)]
    cells = [[fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns] for r in history]
    widths = [max([len(head)] + [len(row[i]) for row in cells]) for i, (_, head, _) in enumerate(columns)]
    lines = ["  ".join(head.rjust(w) for (_, head, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DatasetWithIDs | DataLoader,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    amp: bool | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy over `data`.

    The model runs as `inference_copy` makes it (BatchNorm folded, channels-last: the same outputs up
    to float rounding); `model` itself is left as it was. `amp` None is the inference policy: bf16
    autocast on CUDA and on a CPU with native bf16 (top-1 can move by a borderline image), fp32
    elsewhere. Under DDP each rank evaluates its share of a
    dataset and the sums are reduced, so every rank returns the numbers for the whole set.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp is None:
        amp = autocast_by_default(device)
        amp_dtype = torch.bfloat16 if device.type == "cpu" else amp_dtype
    rank, world = rank_world()
    if isinstance(data, DataLoader):
        loader = data
    else:
        indices = list(range(rank, len(data), world))
        loader = DataLoader(
            torch.utils.data.Subset(data, indices), batch_size=batch_size, generator=torch.Generator()
        )  # leaves the global RNG untouched
    runner = inference_copy(model)
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels, _ in loader:
        images, labels = images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = runner(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        count += labels.numel()
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1)
    return dict(loss=loss_sum / count, top1=100 * correct1 / count, top5=100 * correct5 / count, n=int(count))


# ----------------------------------------------------------------------------- training


@dataclass
class TrainParts:
    """Everything a run builds once and every piece of the loop uses (see `_build`)."""

    model: nn.Module  # the model whose weights are saved
    forward_model: nn.Module  # what the step calls: the model, wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler  # a no-op unless autocasting to float16
    criterion: DistillationLoss
    teacher: Teacher | None  # None unless distilling (a teacher and alpha > 0)
    sampler: EpochShuffleSampler
    loader: DataLoader
    steps_per_epoch: int
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype
    clip_grad: float  # max gradient norm; 0: no clipping
    channels_last: bool  # inputs (and weights) in channels-last memory
    world: int  # processes taking part


@dataclass
class TrainState:
    """Where a run stands; what a checkpoint saves besides weights and optimizer, and what a resume
    restores. `batch`, `loss_sum` and `seen` describe the epoch in progress (all 0 at its start), so a
    run resumed mid-epoch skips the batches it did and logs the same mean loss."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch finished
    loss_sum: float = 0.0  # sum of per-sample losses over the current epoch so far
    seen: int = 0  # samples of the current epoch so far
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best_top1: float = 0.0


def train(
    model: nn.Module,
    train_set: DatasetWithIDs,
    val_set: DatasetWithIDs | None,
    config: TrainConfig,
    *,
    run_dir: str | Path,
    teacher: Teacher | None = None,
    resume: bool = False,
    progress: bool = True,
    model_config: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` on `train_set`, evaluating on `val_set` after every epoch.

    Args:
        model: any classifier returning logits (TinyViT or a torchvision model).
        train_set: a `DatasetWithIDs` with its training transform; its `data_seed` fixes the data
            order and augmentation, `config.seed` the initial RNG state (drop path).
        val_set: evaluated after each epoch (None: no evaluation; best.pt follows train loss).
        config: hyper-parameters; `alpha` and `temperature` apply when there is a `teacher`.
        run_dir: the run's folder (created); holds config.json, log.jsonl, last.pt, best.pt.
        teacher: an `OnlineTeacher` or a `StoredTeacher` (None: labels only, whatever `config.alpha`).
        resume: continue from run_dir/last.pt (exactly where it stopped, mid-epoch included).
        model_config: extra description saved in checkpoints (e.g. how to rebuild the model).
        on_epoch: called with each epoch's record (e.g. to plot live in a notebook).

    Returns a `TrainResult` with the per-epoch history and the best top-1.

    Raises:
        ValueError: a batch larger than the data; resume from a checkpoint of another config or
            process count, or one that cannot be read.
        FileNotFoundError: resume without a checkpoint in `run_dir`.
        FloatingPointError: a NaN or infinite loss (named by step; the last good checkpoint stays).
        LockHeld: another process is training in `run_dir` (one writer per run).
        OSError: a checkpoint could not be written (a full disk): no temporary file is left and
            log.jsonl has no record of the unsaved epoch; under DDP every process raises it together.
    """
    run_dir = Path(run_dir)
    parts = _build(model, train_set, config, teacher)
    with _one_writer(run_dir):
        state = _open_run_dir(run_dir, parts, config, model_config, train_set, resume=resume)
        saver = CheckpointSaver(parts, config, model_config, run_dir, resumed=resume)
        while state.epoch < config.epochs:
            record = train_one_epoch(parts, state, train_set, config, saver=saver, progress=progress)
            if val_set is not None and _validates(state.epoch, config):  # state.epoch: epochs finished
                record.update(_validate(parts, config, val_set))
            _end_epoch(state, record, saver)
            if on_epoch is not None and is_main_process():
                on_epoch(record)
    if parts.world > 1:
        dist.barrier()
    return TrainResult(run_dir=run_dir, history=state.history, best_top1=state.best_top1)


def _validates(epoch: int, config: TrainConfig) -> bool:
    """Whether the run validates after `epoch` (counted from 1): every `eval_every` epochs and the last."""
    return epoch % config.eval_every == 0 or epoch == config.epochs


def _validate(parts: TrainParts, config: TrainConfig, val_set: DatasetWithIDs) -> dict:
    """The epoch's validation numbers (val_loss, top1, top5), evaluated under the inference policy
    unless the run fixed autocast (`config.amp` not None). Under DDP every process first takes rank
    0's buffers: DDP sends them before each forward, so after the last step each process holds its
    own BatchNorm statistics, and the numbers must be those of the model the checkpoints save."""
    if parts.world > 1:
        for buffer in parts.model.buffers():
            dist.broadcast(buffer, src=0)
    metrics = evaluate(
        parts.model,
        val_set,
        device=parts.device,
        batch_size=max(config.batch_size, 256),
        amp=None if config.amp is None else parts.amp,
        amp_dtype=parts.amp_dtype,
    )
    return dict(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"])


@contextlib.contextmanager
def _one_writer(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock on the main process (the one that writes), for the whole run.

    Raises:
        LockHeld: another process is training this run (the message names it).
    """
    if not is_main_process():
        yield
        return
    with FileLock(run_dir / ".lock", what=f"run {run_dir}"):
        yield


def _open_run_dir(
    run_dir: Path,
    parts: TrainParts,
    config: TrainConfig,
    model_config: dict | None,
    train_set: DatasetWithIDs,
    *,
    resume: bool,
) -> TrainState:
    """A resumed run: restore last.pt and cut the log back to the epochs it saved. A new run: its
    folder, an empty log and config.json (what was asked for, and on what data), and no checkpoint
    of a run it replaces (an old best.pt beside the new run's files would pass for the new run's)."""
    if resume:
        state = _restore(parts, config, run_dir / "last.pt")
        _write_on_main(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
        return state
    description = dict(
        train=asdict(config),
        policy=_policy(parts, config),
        model=model_config,
        train_set=train_set.fingerprint(),
        world_size=parts.world,
    )
    if is_main_process():
        for name in ("last.pt", "best.pt"):
            (run_dir / name).unlink(missing_ok=True)
    _write_on_main(run_dir / "log.jsonl", "")
    _write_on_main(run_dir / "config.json", json.dumps(description, indent=2) + "\n")
    return TrainState()


def training_autocast(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype a run of `config` autocasts to while training on `device`, None where it trains in
    fp32: `config.amp` where it is set, else the default policy (`utils.autocast_by_default`; bf16 on
    a CPU only, where float16 would need a GradScaler the CPU has no use for)."""
    amp_dtype = getattr(torch, config.amp_dtype)
    amp = config.amp
    if amp is None:
        amp = autocast_by_default(device) and (device.type == "cuda" or amp_dtype == torch.bfloat16)
    return amp_dtype if amp else None


def _build(model: nn.Module, train_set: DatasetWithIDs, config: TrainConfig, teacher: Teacher | None) -> TrainParts:
    """Device, process group, optimizer, schedule, loss, loader: the parts of a run, built in the
    order that fixes the RNG state (the run's seed, then the model on its device).

    Raises:
        ValueError: the global batch is larger than the training set.
    """
    alpha = config.alpha if teacher is not None else 0.0  # no teacher: labels only
    device = pick_device(config.device)
    init_distributed(device)
    rank, world = rank_world()
    amp_dtype = getattr(torch, config.amp_dtype)
    amp = training_autocast(config, device) is not None
    if device.type == "cpu":
        keep_freed_memory()  # large activations reuse freed memory instead of faulting in new pages
    # Each process its own stream (DropPath's masks), as DeiT and Cream seed: seed + rank. The
    # model's weights come from rank 0 (DDP broadcasts them); a single process draws as before.
    torch.manual_seed(config.seed + rank)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    fused = config.fused_adamw and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=fused)
    sampler, loader, steps_per_epoch = _training_loader(train_set, config, device, rank=rank, world=world)
    schedule = CosineSchedule(
        optimizer,
        lr=config.lr,
        min_lr=config.min_lr,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        total_steps=config.epochs * steps_per_epoch,
    )
    return TrainParts(
        model=model,
        forward_model=_forward_model(model, config, device, world=world),
        optimizer=optimizer,
        schedule=schedule,
        scaler=torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16),
        criterion=DistillationLoss(alpha, config.temperature, config.label_smoothing),
        teacher=teacher if alpha > 0 else None,
        sampler=sampler,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        device=device,
        amp=amp,
        amp_dtype=amp_dtype,
        clip_grad=config.clip_grad,
        channels_last=config.channels_last,
        world=world,
    )


def _training_loader(
    train_set: DatasetWithIDs, config: TrainConfig, device: torch.device, *, rank: int, world: int
) -> tuple[EpochShuffleSampler, DataLoader, int]:
    """This process's share of the training data, in the epoch's order: (sampler, loader, steps per epoch).

    Raises:
        ValueError: the global batch is larger than the training set.
    """
    sampler = EpochShuffleSampler(train_set, rank=rank, world_size=world)
    # The loader gets its own generator: creating an iterator must not draw from the global RNG,
    # whose saved state is what makes a resumed run exact (augmentations are seeded per sample).
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} x {world} process(es) is larger than the {len(train_set)} training samples"
        )
    return sampler, loader, steps_per_epoch


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its compiled graphs: $TORCHINDUCTOR_CACHE_DIR where set, otherwise a
    folder under ~/.cache, so that a graph is compiled once per machine (inductor's default is a
    folder under /tmp, which a reboot empties)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path.home() / ".cache" / "tinyvit_lib" / "inductor")


def _forward_model(model: nn.Module, config: TrainConfig, device: torch.device, *, world: int) -> nn.Module:
    """What the training step calls: the model, wrapped by DDP over `world` processes and/or torch.compile
    (its graphs cached on disk in `compile_cache_dir()`)."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not config.compile:
        return model
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())  # read by inductor when it first compiles
    return torch.compile(model)


def train_one_epoch(
    parts: TrainParts,
    state: TrainState,
    train_set: DatasetWithIDs,
    config: TrainConfig,
    *,
    saver: CheckpointSaver | None = None,
    progress: bool = True,
) -> dict:
    """One pass over the training data from where `state` stands (mid-epoch after a resume); updates
    `state` and returns the epoch's record (train loss, time, images/s), reduced over processes.
    With `saver` and `config.checkpoint_every`, last.pt is also saved every that many steps."""
    epoch, start_batch = state.epoch, state.batch
    train_set.set_epoch(epoch)
    parts.sampler.skip(start_batch * config.batch_size)
    parts.model.train()
    t0, resumed_seen = time.perf_counter(), state.seen
    batches = progress_bar(
        parts.loader,
        total=parts.steps_per_epoch,
        initial=start_batch,
        enabled=progress,
        desc=f"epoch {epoch + 1}/{config.epochs}",
    )
    for batch_index, (images, labels, sample_ids) in enumerate(batches, start=start_batch):
        loss = train_step(parts, images, labels, sample_ids, epoch)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {parts.schedule.step_count} (epoch {epoch + 1}, batch {batch_index}); "
                + (saver.last_saved() if saver else "no checkpoint is kept")
            )
        state.batch = batch_index + 1
        state.seen += len(labels)
        state.loss_sum += loss * len(labels)
        if hasattr(batches, "set_postfix"):
            rate = (state.seen - resumed_seen) * parts.world / max(time.perf_counter() - t0, 1e-9)
            batches.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
        if (
            saver
            and config.checkpoint_every
            and parts.schedule.step_count % config.checkpoint_every == 0
            and state.batch < parts.steps_per_epoch
        ):
            saver.save(state, "last.pt")
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)  # the last step's backward and update are still queued
    elapsed = time.perf_counter() - t0
    loss_sum, seen, timed = all_reduce_sum([state.loss_sum, state.seen, state.seen - resumed_seen], parts.device)
    state.epoch, state.batch, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
    return dict(
        epoch=epoch + 1,
        step=parts.schedule.step_count,
        lr=parts.optimizer.param_groups[0]["lr"],
        train_loss=loss_sum / max(seen, 1),
        epoch_time_s=round(elapsed, 3),
        images_per_s=round(timed / max(elapsed, 1e-9), 1),
    )


def train_step(
    parts: TrainParts,
    images: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    epoch: int,
) -> float:
    """One optimizer step on a batch (B, C, H, W): ask the teacher, forward, backward, clip, step,
    advance the schedule. Returns the loss (the step is skipped only by the float16 scaler;
    a NaN loss is returned for the caller to stop on before anything else is saved; under DDP every
    process returns NaN when one process's loss is not finite, so that all stop at the same step)."""
    images = images.to(parts.device, non_blocking=True)
    labels = labels.to(parts.device, non_blocking=True)
    if parts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = labels  # class indices (B,), or a mixing set's soft targets (B, num_classes)
    teacher_logits = None
    if parts.teacher is not None:
        teacher_logits = parts.teacher.logits(images, sample_ids, epoch)
    with torch.autocast(parts.device.type, dtype=parts.amp_dtype, enabled=parts.amp):
        logits = parts.forward_model(images)
    loss = parts.criterion(logits.float(), targets, teacher_logits)
    loss_value = loss.item()
    finite = math.isfinite(loss_value)
    if parts.world > 1:  # one process skipping backward would leave the others waiting in its all-reduce
        flag = torch.tensor([float(finite)], device=parts.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    if not finite:
        return loss_value if not math.isfinite(loss_value) else math.nan
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()  # the scaler is a no-op unless training in float16
    if parts.clip_grad > 0:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.schedule.step()
    return loss_value


# ----------------------------------------------------------------------------- the run folder


def rng_state(device: torch.device) -> dict:
    """This process's RNG state: the CPU generator's, and `device`'s where it is a GPU (else None)."""
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every process's `rng_state`, indexed by rank, on every process (one all-reduce of the states
    laid side by side, each process filling its own slot); [this process's] when it runs alone."""
    rank, world = rank_world()
    mine = rng_state(device)
    if world == 1:
        return [mine]
    parts = [mine["torch"]] + ([mine["cuda"]] if mine["cuda"] is not None else [])
    flat = torch.cat(parts)  # uint8; every process has the same lengths (same build, same device type)
    slots = [0.0] * (flat.numel() * world)
    slots[rank * flat.numel() : (rank + 1) * flat.numel()] = flat.tolist()
    summed = all_reduce_sum(slots, device)  # bytes are exact in float64
    summed = torch.tensor(summed, dtype=torch.uint8).view(world, -1)  # (world, bytes)
    n_torch = mine["torch"].numel()
    return [dict(torch=row[:n_torch].clone(), cuda=row[n_torch:].clone() if len(parts) > 1 else None) for row in summed]


class CheckpointSaver:
    """Writes a run's checkpoints (main process only): weights, optimizer, schedule, scaler, RNG
    state and the `TrainState`, enough to continue exactly."""

    def __init__(
        self, parts: TrainParts, config: TrainConfig, model_config: dict | None, run_dir: Path, *, resumed: bool
    ) -> None:
        self.parts, self.config, self.model_config, self.run_dir = parts, config, model_config, run_dir
        self.last_path = run_dir / "last.pt"
        self.saved = resumed  # last.pt belongs to this run: resumed from it, or written by `save`

    def last_saved(self) -> str:
        """Where this run's last good checkpoint is, in words."""
        return f"the last good checkpoint is {self.last_path}" if self.saved else "no checkpoint was saved yet"

    def checkpoint(
        self, state: TrainState, partial: tuple[float, float] | None = None, rng_by_rank: list[dict] | None = None
    ) -> dict:
        """What last.pt and best.pt hold; `partial`: the epoch's loss sum and samples so far over
        every process (default: this process's); `rng_by_rank`: every process's RNG state, saved
        when there are several (`gather_rng_states`)."""
        parts = self.parts
        loss_sum, seen = partial if partial is not None else (state.loss_sum, state.seen)
        several = rng_by_rank is not None and len(rng_by_rank) > 1
        return dict(
            format=CHECKPOINT_FORMAT,
            model=parts.model.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=parts.schedule.state_dict(),
            scaler=parts.scaler.state_dict(),
            epoch=state.epoch,
            batch=state.batch,
            step=parts.schedule.step_count,
            partial_loss_sum=loss_sum,  # over every process: a resume gives it to rank 0 alone
            partial_seen=seen,
            rng=rng_state(parts.device),  # this process's (rank 0's)
            **(dict(rng_by_rank=rng_by_rank) if several else {}),  # each process's, by rank
            config=asdict(self.config),
            world_size=parts.world,  # the batch is per process: a resume needs as many processes
            distills=parts.teacher is not None,  # without a teacher's term, alpha and temperature play no part
            model_config=self.model_config,
            history=state.history,
            best_top1=state.best_top1,
        )

    def save(self, state: TrainState, *names: str) -> None:
        """Save the checkpoint of `state` under each of `names` (e.g. "best.pt", "last.pt"). Every
        process calls it (the epoch's partial sums are added up over them); the main one writes."""
        partial = all_reduce_sum([state.loss_sum, state.seen], self.parts.device)
        rng_by_rank = gather_rng_states(self.parts.device)
        failure = None
        if is_main_process():
            checkpoint = self.checkpoint(state, (partial[0], int(partial[1])), rng_by_rank)
            try:
                save_checkpoint(checkpoint, *(self.run_dir / name for name in names))  # serialised once
            except OSError as error:  # e.g. a full disk: raised below, in every process at once
                failure = error
        if failure is not None:
            if self.parts.world > 1:
                all_reduce_sum([1.0], self.parts.device)  # tell the others, then stop with them
            raise failure
        if self.parts.world > 1 and all_reduce_sum([0.0], self.parts.device)[0]:  # the main process failed
            raise OSError(f"the main process could not write {', '.join(names)} in {self.run_dir}; {self.last_saved()}")
        self.saved = self.saved or "last.pt" in names  # every process can name the last good checkpoint


def _score(record: dict) -> float:
    """What "best" means: validation top-1, or (without validation) the lowest training loss."""
    return record.get("top1", -record["train_loss"])


def _improves(record: dict, history: list[dict]) -> bool:
    """Whether `record` is a new best among the epochs measured the same way: a validated epoch
    against the validated ones; an epoch without validation only while none was validated."""
    if "top1" not in record and any("top1" in r for r in history):
        return False
    alike = [r for r in history if ("top1" in r) == ("top1" in record)]
    return not alike or _score(record) > max(_score(r) for r in alike)


def _end_epoch(state: TrainState, record: dict, saver: CheckpointSaver) -> None:
    """Add the epoch's record to the history, save best.pt (if it improved) and last.pt, and only
    then append the record to log.jsonl, so the log never names an epoch whose checkpoint is missing."""
    improved = _improves(record, state.history)
    state.history.append(record)
    state.best_top1 = max(state.best_top1, record.get("top1", 0.0))
    saver.save(state, *(("best.pt", "last.pt") if improved else ("last.pt",)))
    if is_main_process():
        with open(saver.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _restore(parts: TrainParts, config: TrainConfig, path: Path) -> TrainState:
    """Load last.pt into the parts (weights, optimizer, schedule, scaler, RNG) and return where the
    run stood.

    Raises:
        FileNotFoundError, ValueError: no readable checkpoint at `path`, one saved with another config
            (alpha and temperature aside when neither it nor this run distils: they play no part), or
            one saved by another number of processes.
    """
    ckpt = load_checkpoint(path)
    saved, mine = saved_config(ckpt.get("config", {}) if isinstance(ckpt, dict) else {}), asdict(config)
    if parts.teacher is None and ckpt.get("distills") is False:  # labels only, then and now (experiment._flat)
        saved, mine = ({k: v for k, v in c.items() if k not in ("alpha", "temperature")} for c in (saved, mine))
    if saved != mine:
        changed = sorted(k for k, v in mine.items() if saved.get(k) != v)
        raise ValueError(f"cannot resume {path}: the config differs in {changed}")
    if ckpt.get("world_size", parts.world) != parts.world:
        raise ValueError(
            f"cannot resume {path}: it was trained by {ckpt['world_size']} process(es), this run has {parts.world} "
            "(the batch and each process's share of the epoch are per process); resume with as many"
        )
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.schedule.load_state_dict(ckpt["scheduler"])
    if parts.scaler.is_enabled() and ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    rank = rank_world()[0]
    rng = ckpt["rng_by_rank"][rank] if "rng_by_rank" in ckpt else ckpt["rng"]  # one process's, or each's
    torch.set_rng_state(rng["torch"])
    if parts.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], parts.device)
    return TrainState(
        epoch=ckpt["epoch"],
        batch=ckpt["batch"],
        loss_sum=ckpt["partial_loss_sum"] if is_main_process() else 0.0,  # the sums over every process
        seen=ckpt["partial_seen"] if is_main_process() else 0,
        history=list(ckpt["history"]),
        best_top1=ckpt["best_top1"],
    )


def _policy(parts: TrainParts, config: TrainConfig) -> dict:
    """How this run computes, as resolved on this machine: device, memory format, optimizer, autocast
    (training, and evaluation's, see `evaluate`)."""
    cpu = parts.device.type == "cpu"
    eval_amp = autocast_by_default(parts.device) if config.amp is None else parts.amp
    return dict(
        device=str(parts.device),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        channels_last=parts.channels_last,
        fused_adamw=bool(parts.optimizer.defaults.get("fused")),
        autocast=str(parts.amp_dtype).removeprefix("torch.") if parts.amp else None,
        evaluation="BatchNorm folded, channels-last" + (", autocast" if eval_amp else ""),
        native_bf16=cpu_has_native_bf16() if cpu else None,
        malloc_keeps_freed_memory=cpu and sys.platform == "linux",
        threads=torch.get_num_threads(),
    )


def _write_on_main(path: Path, text: str) -> None:
    if is_main_process():
        atomic_write_text(path, text)
