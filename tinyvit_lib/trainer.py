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

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .augment import AugmentConfig, PairedMix
from .data import DatasetWithIDs, EpochShuffleSampler
from .distill import DistillationLoss, Teacher

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "pick_device",
           "save_checkpoint", "load_checkpoint", "param_groups", "CosineSchedule", "read_log"]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run. `batch_size` is per process; the global batch is
    batch_size x world size. Learning rates are for the global batch as given (no implicit scaling).

    Raises:
        ValueError: a value out of range (named in the message).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 5.0  # max gradient norm; 0 turns clipping off
    distill_alpha: float = 0.0  # weight of the teacher term (0: no teacher)
    distill_temp: float = 1.0
    mix: bool = False  # paired Mixup/CutMix with the dataset's augmentation config
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), or any torch device string
    amp: bool | None = None  # autocast; None: on for CUDA only
    amp_dtype: str = "bfloat16"  # or "float16" (GPUs without bf16): then a GradScaler scales the loss
    compile: bool = False
    num_workers: int = 0
    checkpoint_every: int = 0  # also save last.pt every this many steps (0: at epoch ends only)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "min_lr": 0 <= self.min_lr <= self.lr, "warmup_epochs": self.warmup_epochs >= 0,
            "weight_decay": self.weight_decay >= 0, "label_smoothing": 0 <= self.label_smoothing < 1,
            "clip_grad": self.clip_grad >= 0, "distill_alpha": 0 <= self.distill_alpha <= 1,
            "distill_temp": self.distill_temp > 0, "num_workers": self.num_workers >= 0,
            "checkpoint_every": self.checkpoint_every >= 0, "amp_dtype": self.amp_dtype in ("bfloat16", "float16"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid training config: " + ", ".join(f"{n}={getattr(self, n)}" for n in bad))


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
    """"auto" picks CUDA, then Apple's MPS, then the CPU; anything else is passed to torch.device.

    Raises:
        ValueError: an unknown device string, or CUDA/MPS asked for where there is none.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
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

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                 total_steps: int) -> None:
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
        return dict(step_count=self.step_count, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                    total_steps=self.total_steps)

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, flushed, then renamed over `path`:
    a kill at any moment leaves either the previous complete file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain values only).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (`log.jsonl`), oldest first."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (no-op when alone)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if _rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetWithIDs | DataLoader, *, device: torch.device | str | None = None,
             batch_size: int = 256, amp: bool = False, amp_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy over `data`.

    Under DDP each rank evaluates its share of a dataset and the sums are reduced, so every rank
    returns the numbers for the whole set.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = _rank_world()
    if isinstance(data, DataLoader):
        loader = data
    else:
        indices = list(range(rank, len(data), world))
        loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=batch_size,
                            generator=torch.Generator())  # leaves the global RNG untouched
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        count += labels.numel()
    model.train(was_training)
    loss_sum, correct1, correct5, count = _all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1)
    return dict(loss=loss_sum / count, top1=100 * correct1 / count, top5=100 * correct5 / count, n=int(count))


# ----------------------------------------------------------------------------- training

def train(model: nn.Module, train_set: DatasetWithIDs, val_set: DatasetWithIDs | None, config: TrainConfig, *,
          run_dir: str | Path, teacher: Teacher | None = None, resume: bool = False, progress: bool = True,
          model_config: dict | None = None, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `model` on `train_set`, evaluating on `val_set` after every epoch.

    Args:
        model: any classifier returning logits (TinyViT or a torchvision model).
        train_set: a `DatasetWithIDs` with its training transform; its `base_seed` fixes the data
            order and augmentation, `config.seed` the initial RNG state (drop path).
        val_set: evaluated after each epoch (None: no evaluation; best.pt follows train loss).
        config: hyper-parameters; `distill_alpha > 0` needs a `teacher`.
        run_dir: the run's folder (created); holds config.json, log.jsonl, last.pt, best.pt.
        teacher: an `OnlineTeacher` or a logit store's teacher (see `Teacher`).
        resume: continue from run_dir/last.pt (exactly where it stopped, mid-epoch included).
        model_config: extra description saved in checkpoints (e.g. how to rebuild the model).
        on_epoch: called with each epoch's record (e.g. to plot live in a notebook).

    Returns:
        A `TrainResult` with the per-epoch history and the best top-1.

    Raises:
        ValueError: distillation asked for without a teacher; resume without a checkpoint or
            with a different config.
        FloatingPointError: the loss became NaN or infinite (the message names the step; the
            last good checkpoint stays in place).
    """
    if config.distill_alpha > 0 and teacher is None:
        raise ValueError(f"distill_alpha={config.distill_alpha} needs a teacher (an online model or a logit store)")
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    device = pick_device(config.device)
    _init_distributed(device)
    rank, world = _rank_world()
    is_main = rank == 0
    amp = device.type == "cuda" if config.amp is None else config.amp
    amp_dtype = getattr(torch, config.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    torch.manual_seed(config.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    sampler = EpochShuffleSampler(train_set, rank=rank, world_size=world)
    # The loader gets its own generator: creating an iterator must not draw from the global RNG,
    # whose saved state is what makes a resumed run exact (augmentations are seeded per sample).
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} x {world} process(es) is larger than the "
                         f"{len(train_set)} training samples")
    schedule = CosineSchedule(optimizer, lr=config.lr, min_lr=config.min_lr,
                              warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                              total_steps=config.epochs * steps_per_epoch)
    criterion = DistillationLoss(config.distill_alpha, config.distill_temp, config.label_smoothing)
    mixer = PairedMix(train_set.num_classes, _augment_config(train_set)) if config.mix else None
    result = TrainResult(run_dir=run_dir)
    start_epoch, start_batch, partial = 0, 0, (0.0, 0)

    if resume:
        ckpt = load_checkpoint(last_path)
        if ckpt.get("config") != asdict(config):
            changed = sorted(k for k, v in asdict(config).items() if ckpt.get("config", {}).get(k) != v)
            raise ValueError(f"cannot resume {last_path}: the config differs in {changed}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start_epoch, start_batch = ckpt["epoch"], ckpt["batch"]
        partial = (ckpt["partial_loss_sum"], ckpt["partial_seen"])
        result.history, result.best_top1 = list(ckpt["history"]), ckpt["best_top1"]
        if is_main:  # the checkpoint's history is the truth: drop records of epochs not saved
            (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.history))
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "log.jsonl").write_text("")
        (run_dir / "config.json").write_text(json.dumps(
            dict(train=asdict(config), model=model_config, train_set=train_set.fingerprint(),
                 world_size=world), indent=2) + "\n")

    forward_model = model
    if world > 1:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        forward_model = torch.compile(forward_model)

    def checkpoint(epoch: int, batch: int, partial: tuple[float, int] = (0.0, 0)) -> dict:
        """`partial`: (loss sum, samples) of the epoch so far, so a resumed epoch logs the same mean."""
        return dict(format=CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=schedule.state_dict(), scaler=scaler.state_dict(), epoch=epoch, batch=batch,
                    step=schedule.step_count,
                    partial_loss_sum=partial[0], partial_seen=partial[1],
                    rng=dict(torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
                    config=asdict(config), model_config=model_config, history=result.history,
                    best_top1=result.best_top1)

    for epoch in range(start_epoch, config.epochs):
        train_set.set_epoch(epoch)
        sampler.skip(start_batch * config.batch_size)
        model.train()
        t0, (loss_sum, seen) = time.perf_counter(), partial
        resumed_seen = seen
        batches = _progress(loader, total=steps_per_epoch, initial=start_batch, enabled=progress and is_main,
                            desc=f"epoch {epoch + 1}/{config.epochs}")
        for batch_index, (images, labels, sample_ids) in enumerate(batches, start=start_batch):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixer is not None:
                seeds = [train_set.seed_for(int(i), epoch) for i in sample_ids]
                images, targets = mixer(images, labels, seeds)
            teacher_probs = (teacher.probs(images, sample_ids, epoch, config.distill_temp)
                             if teacher is not None and config.distill_alpha > 0 else None)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = forward_model(images)
            loss = criterion(logits.float(), targets, teacher_probs=teacher_probs)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at step {schedule.step_count} (epoch {epoch + 1}, batch {batch_index}); "
                    f"the last good checkpoint is {last_path}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # the scaler is a no-op unless training in float16
            if config.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            seen += labels.numel()
            loss_sum += loss_value * labels.numel()
            elapsed = time.perf_counter() - t0
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{loss_value:.3f}",
                                    img_s=f"{(seen - resumed_seen) * world / max(elapsed, 1e-9):.0f}")
            done = batch_index + 1
            if is_main and config.checkpoint_every and schedule.step_count % config.checkpoint_every == 0 \
                    and done < steps_per_epoch:
                save_checkpoint(checkpoint(epoch, done, (loss_sum, seen)), last_path)
        start_batch, partial = 0, (0.0, 0)
        elapsed = time.perf_counter() - t0
        loss_sum, seen, timed = _all_reduce_sum([loss_sum, seen, seen - resumed_seen], device)
        record = dict(epoch=epoch + 1, step=schedule.step_count, lr=optimizer.param_groups[0]["lr"],
                      train_loss=loss_sum / max(seen, 1), epoch_time_s=round(elapsed, 3),
                      images_per_s=round(timed / max(elapsed, 1e-9), 1))
        if val_set is not None:
            metrics = evaluate(model, val_set, device=device, batch_size=max(config.batch_size, 256), amp=amp,
                               amp_dtype=amp_dtype)
            record.update(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"])
        score = record.get("top1", -record["train_loss"])
        improved = not result.history or score > max(r.get("top1", -r["train_loss"]) for r in result.history)
        result.history.append(record)
        result.best_top1 = max(result.best_top1, record.get("top1", 0.0))
        if is_main:
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            state = checkpoint(epoch + 1, 0)
            if improved:
                save_checkpoint(state, best_path)
            save_checkpoint(state, last_path)
            if on_epoch is not None:
                on_epoch(record)
    if world > 1:
        dist.barrier()
    return result


def _augment_config(dataset: DatasetWithIDs) -> AugmentConfig:
    config = getattr(dataset.transform, "config", None)
    return config if isinstance(config, AugmentConfig) else AugmentConfig()


def _progress(iterable: Iterable, *, total: int, initial: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit="batch", leave=False)
