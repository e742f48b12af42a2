"""Knowledge distillation: the loss, where the teacher's predictions come from (an online model or
a logit store), the precompute that fills a store and the check that re-runs the teacher on it.
(The original plan's `FastDistillation` facade lives in `compat`.)

The loss blends ground-truth labels with the teacher's predictions:

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). The T^2 factor (Hinton et al., 2015) keeps the gradient scale of
the soft term independent of T, so alpha means the same at every temperature. With alpha = 1 and
T = 1 the loss is TinyViT's pretraining objective: the cross-entropy between the teacher's
distribution and the student's, which differs from the KL term only by the teacher's entropy, a
constant of the data.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .augment import MIX_PRESETS, TrainTransform
from .data import DatasetWithIDs, DataSpec, SubsetWithIDs
from .logit_store import (
    LogitStore,
    StoreHeader,
    StoreMismatch,
    StoreWriter,
    encode_records,
    official_record_bytes,
    pending_settings,
    read_pending,
    rebuild_logits,
    remove_store,
)
from .model import inference_copy
from .utils import progress as progress_bar
from .utils import rank_world

__all__ = [
    "ALPHA",
    "TEMPERATURE",
    "TOP_K",
    "DistillationLoss",
    "input_channels",
    "store_spec_differences",
    "soft_cross_entropy",
    "Teacher",
    "OnlineTeacher",
    "StoredTeacher",
    "precompute",
    "verify_store",
    "describe_verify",
    "VerifyTolerance",
    "store_header",
    "weights_sha256",
    "PrecomputeStats",
    "topk_mass",
    "topk_fidelity",
    "precompute_or_reuse",
    "storage_comparison",
    "dataset_seeds",
]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy for integer labels (B,) or probability targets (B, C) (Mixup/CutMix).

    Raises:
        ValueError: targets of another shape than (B,) or (B, C) for logits (B, C) (a (B, 1) column of
            labels would otherwise broadcast as probabilities).
    """
    if target.shape not in (logits.shape[:1], logits.shape):
        raise ValueError(
            f"targets of shape {tuple(target.shape)} for logits of shape {tuple(logits.shape)}: "
            "class indices (B,) or probabilities (B, C)"
        )
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


# One default each for the distillation hyper-parameters (DeiT's alpha, Hinton's T = 1); TrainConfig,
# the CLI and the loss all use these. The course's profiles choose the paper's recipe, alpha = 1.
ALPHA = 0.5
TEMPERATURE = 1.0
TOP_K = 10  # logits a store keeps per image by default (Cream keeps 100 of ImageNet-21k's 21,841 classes)


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
    batch mean. The loss owns T: teachers, online or stored, give logits, and only `soft_term`
    softens them.

    Args:
        alpha: weight of the teacher term, in [0, 1]; 0 is plain supervised training.
        temperature: T > 0; both sides' logits are divided by T before the softmax.
        label_smoothing: applied to the hard-label term only.

    Raises:
        ValueError: alpha outside [0, 1], T <= 0, label_smoothing outside [0, 1), or (from `forward`)
            teacher logits missing when alpha > 0 or of another shape than the student's, or targets
            of another shape than (B,) or (B, C) (`soft_cross_entropy`).
    """

    def __init__(self, alpha: float = ALPHA, temperature: float = TEMPERATURE, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if not temperature > 0.0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, label_smoothing={self.label_smoothing}"

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean; both (B, C)."""
        T = self.temperature
        teacher_probs = F.softmax(teacher_logits.float() / T, dim=-1)
        log_student = F.log_softmax(student_logits.float() / T, dim=-1)
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
        return kl.mean() * T * T

    def forward(
        self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of a batch: `student_logits` (B, C); `targets`, class indices (B,) or soft targets
        (B, C) of mixed views; `teacher_logits` (B, C), needed when alpha > 0."""
        hard = soft_cross_entropy(student_logits.float(), targets, self.label_smoothing) if self.alpha < 1 else None
        if self.alpha == 0.0:
            return hard
        if teacher_logits is None:
            raise ValueError(f"alpha={self.alpha} needs the teacher's logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher shape {tuple(teacher_logits.shape)} does not match "
                f"the student's logits {tuple(student_logits.shape)}"
            )
        soft = self.soft_term(student_logits, teacher_logits)
        return soft if hard is None else (1 - self.alpha) * hard + self.alpha * soft


# ----------------------------------------------------------------------------- where the teacher comes from


class Teacher:
    """Where the teacher's logits for a training batch come from: a model run now, or a store."""

    def logits(
        self, images: torch.Tensor, sample_ids: torch.Tensor | None = None, epoch: int | None = None
    ) -> torch.Tensor:
        """The teacher's logits for the batch's views, float32 (B, num_classes) on images.device."""
        raise NotImplementedError

    def to(self, device: torch.device) -> Teacher:
        return self


def input_channels(model: nn.Module) -> int:
    """The channel count a model's first convolution takes.

    Raises:
        ValueError: the model has no convolution to read it from.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"cannot tell the input channels of {type(model).__name__}: it has no Conv2d")
    return first.in_channels


class OnlineTeacher(Teacher):
    """Runs a model on the same augmented batch as the student: the slow baseline that stored
    logits remove. A grayscale batch is repeated to the model's channel count for an RGB teacher.

    The teacher runs as `inference_copy` makes it (BatchNorm folded, channels-last memory: the same
    logits up to float rounding); `model` itself is left as it was. On a CPU it computes in fp32: its
    answers become the student's targets, stored in fp16, and bf16 autocast would round them more
    coarsely than the store does. On CUDA it runs under bf16 autocast."""

    def __init__(self, model: nn.Module) -> None:
        self.in_chans = input_channels(model)
        self.model = inference_copy(model)

    def to(self, device: torch.device) -> OnlineTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(
        self, images: torch.Tensor, sample_ids: torch.Tensor | None = None, epoch: int | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) float32 logits; `sample_ids` and `epoch` are not needed."""
        if images.shape[1] != self.in_chans:
            images = images.expand(-1, self.in_chans, -1, -1)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            return self.model(images).float()


class StoredTeacher(Teacher):
    """The teacher's logits read from a logit store instead of computed.

    Static stores are looked up by sample; replay stores also check that the data loader made
    exactly the view the teacher saw (same augmentation seed), so a mismatched pipeline fails
    loudly instead of distilling from the wrong image.

    `epochs`, the number of epochs the student will train (None: not checked), refuses a replay
    store that holds fewer epochs of views before training starts; a static store serves any number.

    Raises (from the constructor and `open`):
        StoreMismatch: the store was made for another dataset, resolution or augmentation, or is a
            replay store of fewer epochs than `epochs` (both numbers are named).
        FileNotFoundError, ValueError (from `open`): as `LogitStore.open`.
    """

    def __init__(self, store: LogitStore, dataset: DatasetWithIDs, *, epochs: int | None = None) -> None:
        header = store.header
        problems = []
        if epochs is not None and header.mode == "replay" and header.epochs < epochs:
            problems.append(
                f"epochs: the replay store holds {header.epochs} epoch(s) of views, the run trains {epochs} "
                f"(precompute --mode replay --epochs {epochs} or more)"
            )
        self.positions, fingerprint_problems = _store_positions(header, dataset)
        problems += fingerprint_problems
        img_size = getattr(dataset.transform, "img_size", None)
        if img_size != header.img_size:
            problems.append(f"img_size: store {header.img_size}, data {img_size}")
        mix = data_mixing(dataset)
        if mix != header.mix:
            problems.append(f"mix: store {header.mix or 'views not mixed'}, data {mix or 'views not mixed'}")
        if header.mode == "replay":
            if repr(dataset.transform) != header.transform:
                problems.append(f"transform: store {header.transform}, data {dataset.transform!r}")
            if dataset.data_seed != header.data_seed:
                problems.append(f"data_seed: store {header.data_seed}, data {dataset.data_seed}")
        if problems:
            raise StoreMismatch(f"logit store {store.path} does not fit this training data: " + "; ".join(problems))
        self.store, self.dataset = store, dataset

    @classmethod
    def open(
        cls, path: str | Path, dataset: DatasetWithIDs, *, verify: bool = True, epochs: int | None = None
    ) -> StoredTeacher:
        """The store at `path` for training on `dataset` for `epochs` epochs (None: not checked);
        `verify` checks the record files' checksums (see the class docstring for what is raised)."""
        return cls(LogitStore.open(path, verify=verify), dataset, epochs=epochs)

    def logits(
        self, images: torch.Tensor | None, sample_ids: torch.Tensor | None = None, epoch: int | None = None
    ) -> torch.Tensor:
        """The stored logits of the batch's samples in `epoch`, on images.device (the IDs locate the
        records; the images are not read). See `logits_for_ids`."""
        if sample_ids is None or epoch is None:
            raise ValueError("a stored teacher needs the batch's sample_ids and epoch to find its records")
        return self.logits_for_ids(sample_ids, epoch, "cpu" if images is None else images.device)

    def logits_for_ids(self, sample_ids: torch.Tensor, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The stored logits of the samples `sample_ids` (B,) in `epoch`, float32 (B, num_classes) on
        `device`; the classes outside a record's top k hold its `rest` logit (see `rebuild_logits`).

        Raises:
            ValueError: a replay store whose stored seeds differ from the dataset's seeds for these
                samples in `epoch` (the student would not see the view the teacher saw), or an
                epoch the store does not hold.
            IndexError: a sample ID outside the store.
        """
        ids = sample_ids.long().cpu()
        outside = ids[(ids < 0) | (ids >= len(self.dataset))]
        if outside.numel():  # a negative ID would wrap to a subset's last samples
            raise IndexError(f"sample id(s) {outside[:5].tolist()} not in the dataset ({len(self.dataset)} samples)")
        positions = ids if self.positions is None else self.positions[ids]
        records = self.store.records(epoch, positions.numpy())
        if self.store.header.mode == "replay":
            expected = [self.dataset.seed_for(int(i), epoch) for i in ids]
            if records["seed"].tolist() != expected:
                raise ValueError(
                    f"epoch {epoch}: the data loader's augmentation seeds differ from the stored views "
                    f"(store {self.store.path}); the student would not see what the teacher saw"
                )
        if self.store.header.mix and records["partner"].tolist() != self.dataset.partners(ids.tolist(), epoch):
            raise ValueError(
                f"epoch {epoch}: the data loader mixes these samples with other partners than the stored views "
                f"(store {self.store.path}); the student would not see what the teacher saw"
            )
        return rebuild_logits(records, self.store.header.num_classes).to(device)


def _store_positions(header: StoreHeader, dataset: DatasetWithIDs) -> tuple[torch.Tensor | None, list[str]]:
    """Where `dataset`'s samples sit in a store with `header`: (None: the same positions, or the store
    position of each subset position; the fingerprint differences when the store is of other data)."""
    if isinstance(dataset, SubsetWithIDs) and dataset.parent.fingerprint() == header.dataset:
        return torch.tensor(dataset.indices, dtype=torch.long), []  # subset position -> store position
    fp = dataset.fingerprint()
    if fp == header.dataset:
        return None, []
    return None, [
        f"dataset {key}: store {header.dataset.get(key)!r}, data {fp.get(key)!r}"
        for key in fp
        if fp.get(key) != header.dataset.get(key)
    ]


def store_spec_differences(header: StoreHeader, spec: DataSpec) -> list[str]:
    """Why a student whose data is `spec` cannot read a store with `header`, one "field: store X, run Y"
    line per field ([]: it can). A store covers the images and views of the spec it was written from:
    the dataset, resolution, validation carve and mixing always; the augmentation and the data seed
    for a replay store (a static store holds evaluation views); the labelled subset unless the store
    covers the whole pool (then any subset of it reads its records; not for mixed views under a
    validation carve, whose subsets pair within themselves). A store written without a spec returns
    []: it is checked by fingerprint once the data is loaded (`StoredTeacher`)."""
    if header.data is None:
        return []
    fields = ("dataset", "img_size", "val_per_class", "mix")
    fields += ("augment", "data_seed") if header.mode == "replay" else ()
    run = spec.for_store()
    problems = [
        f"{name}: store {header.data.get(name)!r}, run {run[name]!r}"
        for name in fields
        if header.data.get(name) != run[name]
    ]
    stored_cut = header.data.get("max_per_class")
    pairs_within = header.data.get("mix") is not None and header.data.get("val_per_class") is not None
    if (stored_cut is not None or pairs_within) and stored_cut != spec.max_per_class:
        problems.append(f"max_per_class: store {stored_cut!r}, run {spec.max_per_class!r}")
    return problems


# ----------------------------------------------------------------------------- precompute and verify


def data_mixing(dataset: DatasetWithIDs) -> dict[str, float]:
    """The mixing settings of `dataset`'s views as a store records them ({}: views not mixed)."""
    return dataset.mix.config.to_dict() if dataset.mix is not None else {}


def weights_sha256(weights: nn.Module | dict[str, torch.Tensor]) -> str:
    """A hash of a model's weights (its state dict, or a state dict, in key order): names the teacher
    in a store, and a run's weights in a sweep's results."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def store_header(
    teacher: nn.Module,
    teacher_name: str,
    dataset: DatasetWithIDs,
    *,
    k: int,
    mode: str,
    epochs: int = 1,
    spec: DataSpec | None = None,
) -> StoreHeader:
    """What a store of this teacher on this dataset promises (compared when it is reopened); `spec`,
    the data spec `dataset` was built from, is recorded so that students are checked against it
    before their data loads (`store_spec_differences`)."""
    return StoreHeader(
        teacher=dict(
            name=teacher_name,
            parameters=sum(p.numel() for p in teacher.parameters()),
            weights_sha256=weights_sha256(teacher),
        ),
        dataset=dataset.fingerprint(),
        img_size=int(getattr(dataset.transform, "img_size", 0)),
        transform=repr(dataset.transform),
        mode=mode,
        k=k,
        num_classes=dataset.num_classes,
        epochs=epochs,
        data_seed=dataset.data_seed,
        mix=data_mixing(dataset),
        data=None if spec is None else spec.for_store(),
    )


@dataclass
class PrecomputeStats:
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def dataset_seeds(dataset: DatasetWithIDs) -> Callable[[int, np.ndarray], np.ndarray]:
    """`seeds(epoch, positions)`: the augmentation seeds of the samples at `positions` of `dataset`
    in `epoch`, an int64 array (what a replay store's records carry, see `StoreWriter`)."""

    def seeds(epoch: int, positions: np.ndarray) -> np.ndarray:
        return np.array([dataset.seed_for(int(p), epoch) for p in positions], dtype=np.int64)

    return seeds


def _check_precompute_arguments(dataset: DatasetWithIDs, mode: str, num_workers: int) -> None:
    """Raises ValueError: num_workers < 0, a static store of an augmented dataset, a replay store of
    an unaugmented one, or mixed views of a subset (pairs span the whole dataset: a record names its
    partner by position in the store)."""
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    augmented = isinstance(dataset.transform, TrainTransform)
    if mode == "static" and augmented:
        raise ValueError("a static store records the evaluation view: build the dataset without augment")
    if mode == "replay" and not augmented:
        raise ValueError("a replay store records augmented views: build the dataset with an augment config")
    if dataset.mix is not None and dataset.pair_root()[1] is not None:
        raise ValueError(
            "a store of mixed views pairs samples over the whole dataset: precompute it over the dataset, "
            "not a subset (students on a subset read it as they read any store)"
        )


def _check_spec_describes(spec: DataSpec, dataset: DatasetWithIDs) -> None:
    """Raises ValueError: `spec` (what a store will record) is not the spec of `dataset`'s views: another
    resolution, augmentation on or off, data seed or mixing (each differing field named)."""
    augmented = isinstance(dataset.transform, TrainTransform)
    described = dict(
        img_size=getattr(dataset.transform, "img_size", None),
        augmented=augmented,
        data_seed=dataset.data_seed if augmented else spec.data_seed,
        mix=data_mixing(dataset),
    )
    stated = dict(
        img_size=spec.img_size,
        augmented=spec.augment != "none",
        data_seed=spec.data_seed,
        mix=MIX_PRESETS[spec.mix].to_dict() if spec.mix else {},
    )
    differing = [
        f"{key}: spec {stated[key]!r}, data {described[key]!r}" for key in stated if stated[key] != described[key]
    ]
    if differing:
        raise ValueError("the data spec to record is not the dataset's: " + "; ".join(differing))


def _write_epoch(
    writer: StoreWriter,
    online: OnlineTeacher,
    dataset: DatasetWithIDs,
    epoch: int,
    *,
    device: torch.device,
    num_workers: int,
    progress: bool,
) -> int:
    """Run the teacher on this rank's batches of `epoch` still to do and append their records; the
    number of images run.

    Raises:
        ValueError: a teacher whose class count differs from the store's.
    """
    header = writer.header
    dataset.set_epoch(epoch)
    todo = writer.todo(epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=[list(writer.positions(b)) for b in todo],
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    loader = progress_bar(
        loader, total=len(todo), desc=f"teacher logits, epoch {epoch + 1}/{header.epochs}", enabled=progress
    )
    images_done = 0
    for images, _labels, sample_ids in loader:
        logits = online.logits(images.to(device, non_blocking=True))
        if logits.shape[1] != header.num_classes:
            raise ValueError(f"the teacher outputs {logits.shape[1]} classes, the dataset has {header.num_classes}")
        seeds = writer.seeds(epoch, sample_ids.numpy()) if header.mode == "replay" else [-1] * len(sample_ids)
        partners = dataset.partners(sample_ids.tolist(), epoch) if header.mix else None
        writer.append(epoch, encode_records(logits, seeds, header.k, partners))
        images_done += len(sample_ids)
    return images_done


def precompute(
    teacher: nn.Module,
    dataset: DatasetWithIDs,
    path: str | Path,
    *,
    k: int,
    mode: str = "static",
    epochs: int = 1,
    teacher_name: str = "teacher",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    spec: DataSpec | None = None,
) -> tuple[LogitStore, PrecomputeStats]:
    """Run the teacher once over `dataset` and store its top-k logits at `path`.

    static: one record per sample, from the dataset's evaluation transform. replay: one record per
    sample and epoch, from the augmented view of that epoch (its seed stored), for `epochs` epochs.
    `spec`: the data spec `dataset` was built from, recorded in the store's header. Resumable (run
    it again after a kill: complete batches whose records carry their views' seeds are kept, the
    result is byte-identical) and sharded under torchrun (each rank writes its share; rank 0
    assembles the store). One precompute per path at a time (see `StoreWriter`). The arguments are
    checked before anything is written (the teacher's class count once it has run on a batch).

    Raises:
        ValueError: k outside [1, classes], epochs < 1 (or != 1 for a static store), an unknown mode,
            batch_size < 1 or num_workers < 0 (from `StoreHeader`, `StoreWriter` and here); a static
            store asked of an augmented dataset, a replay store of an unaugmented one, mixed views
            of a subset; a `spec` that is not the dataset's (`_check_spec_describes`); a teacher whose
            class count differs; a `path` that cannot be written (a file, read-only: the OS's reason
            is named); records that fail the check when the store is assembled.
        StoreMismatch: an unfinished precompute with other settings is at `path`.
        FileExistsError: a complete store is already at `path`.
        LockHeld: another precompute is writing `path` (the message names its process and host).
    """
    _check_precompute_arguments(dataset, mode, num_workers)
    if spec is not None:
        _check_spec_describes(spec, dataset)
    device = torch.device(device)
    rank, world = rank_world()
    header = store_header(teacher, teacher_name, dataset, k=k, mode=mode, epochs=epochs, spec=spec)  # checks k, mode
    seeds = dataset_seeds(dataset) if mode == "replay" else None
    partners = (lambda epoch, positions: dataset.partners(positions.tolist(), epoch)) if header.mix else None
    with StoreWriter(
        path, header, batch_size=batch_size, rank=rank, world_size=world, seeds=seeds, partners=partners
    ) as writer:
        online = OnlineTeacher(teacher).to(device)
        images_done, t0 = 0, time.perf_counter()
        for epoch in range(header.epochs):
            images_done += _write_epoch(
                writer, online, dataset, epoch, device=device, num_workers=num_workers, progress=progress
            )
        seconds = time.perf_counter() - t0
        if world > 1:
            dist.barrier()
        store = writer.finish() if rank == 0 else None
        if world > 1:
            dist.barrier()  # every rank keeps its lock until the store is complete
    return store or LogitStore.open(path, verify=False), PrecomputeStats(images_done, seconds)


@dataclass(frozen=True)
class VerifyTolerance:
    """How far a fresh run of the teacher may be from a store's records for `verify_store` to pass.

    The stored logits are fp16: rounding moves a logit v by at most half a unit in the last place,
    |v| * 2**-11. The value bound is `relative` times the largest |logit| checked (at least 1), so
    the default, 2**-10, allows twice fp16 rounding and nothing more. On CUDA the teacher runs under
    bf16 autocast (`OnlineTeacher`), where a different batch composition may move a logit by a few
    bf16 units (2**-8 each): `for_device` gives 2**-6 there (not measured on a GPU in this project).
    A stored top-k index that differs from the fresh ranking needs two logits closer than that
    rounding, so `index_mismatch_rate` (of all stored indices checked) stays near 0.
    """

    relative: float = 2.0**-10
    index_mismatch_rate: float = 0.01

    @classmethod
    def for_device(cls, device: torch.device | str) -> VerifyTolerance:
        """The tolerance for a teacher run on `device` (bf16 autocast on CUDA, fp32 elsewhere)."""
        return cls(relative=2.0**-6) if torch.device(device).type == "cuda" else cls()

    def value_bound(self, largest_logit: float) -> float:
        """The largest |stored - fresh| logit allowed when the largest |logit| checked is `largest_logit`."""
        return self.relative * max(abs(largest_logit), 1.0)


@torch.no_grad()
def describe_verify(report: dict) -> str:
    """`verify_store`'s report as one line: records checked, the largest logit error and the index
    mismatch rate, each beside its tolerance, and ok or FAILED."""
    return (
        f"{report['records']} records, largest value error {report['max_value_error']:.4g} "
        f"(tolerance {report['value_tolerance']:.4g}), index mismatch rate {report['index_mismatch_rate']:.2%} "
        f"(tolerance {report['index_mismatch_tolerance']:.2%}): {'ok' if report['ok'] else 'FAILED'}"
    )


def verify_store(
    store: LogitStore,
    teacher: nn.Module,
    dataset: DatasetWithIDs,
    *,
    samples: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    tolerance: VerifyTolerance | None = None,
) -> dict:
    """Re-run the teacher on `samples` stored records (drawn with random seed `seed`), replaying
    each record's view from the store alone (its augmentation seed; for a mixed view also its
    partner's position and the partner's record's seed), and compare. Reads the store, writes nothing.

    Returns a dict: `records` (checked), `max_value_error` (the largest |stored - fresh| logit among
    the stored top-k), `value_tolerance` (its bound, see `VerifyTolerance`), `index_mismatch_rate`
    (how often a stored top-k index differs from the fresh ranking), `index_mismatch_tolerance`, and
    `ok` (both within their tolerance). `tolerance` defaults to `VerifyTolerance.for_device(device)`.

    Raises:
        ValueError: samples < 1.
        StoreMismatch: as `_check_verify_data`.
        ValueError, FileNotFoundError: an image that cannot be read (see the dataset's `load_image`).
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    header = store.header
    _check_verify_data(store, dataset)
    tolerance = VerifyTolerance.for_device(device) if tolerance is None else tolerance
    g = torch.Generator().manual_seed(seed)
    count = min(samples, header.size * header.epochs)
    picks = torch.randperm(header.size * header.epochs, generator=g)[:count]
    online = OnlineTeacher(teacher).to(torch.device(device))
    worst, largest, mismatched = 0.0, 0.0, 0
    for chunk in picks.split(64):
        epochs, positions = chunk // header.size, chunk % header.size
        records = np.concatenate([store.records(int(e), [int(p)]) for e, p in zip(epochs, positions)])
        views = [
            _replayed_view(store, dataset, int(e), int(p), record) for e, p, record in zip(epochs, positions, records)
        ]
        fresh = online.logits(torch.stack(views).to(device)).cpu()  # (b, C)
        stored_index = torch.from_numpy(records["index"].astype(np.int64))  # (b, k)
        stored_value = torch.from_numpy(records["value"].astype(np.float32))
        error = (fresh.gather(1, stored_index) - stored_value).abs().max().item()
        worst = max(worst, math.inf if math.isnan(error) else error)  # a NaN from the teacher fails the check
        largest = max(largest, stored_value.abs().max().item())
        mismatched += int((fresh.topk(header.k, dim=1).indices != stored_index).sum())
    value_tolerance = tolerance.value_bound(largest)
    mismatch_rate = mismatched / max(count * header.k, 1)
    return dict(
        records=count,
        max_value_error=worst,
        value_tolerance=value_tolerance,
        index_mismatch_rate=mismatch_rate,
        index_mismatch_tolerance=tolerance.index_mismatch_rate,
        ok=worst <= value_tolerance and mismatch_rate <= tolerance.index_mismatch_rate,
    )


def _check_verify_data(store: LogitStore, dataset: DatasetWithIDs) -> None:
    """Raises StoreMismatch: `dataset` is not the data the store was written from, in the same order
    and views (as a student's would be refused, `StoredTeacher`: another fingerprint, resolution,
    transform, data seed or mixing), or a subset of it (`verify_store` replays views by position)."""
    _refuse_other_mixing(store, dataset)
    if StoredTeacher(store, dataset).positions is not None:
        raise StoreMismatch(
            f"verify logit store {store.path} over the {store.header.size} samples it was written from, in its "
            f"order, not over a subset or another order of them ({len(dataset)} samples)"
        )


def _refuse_other_mixing(store: LogitStore, dataset: DatasetWithIDs) -> None:
    """Raises StoreMismatch: the store's views are mixed otherwise than `dataset`'s (or one side not at all)."""
    if data_mixing(dataset) != store.header.mix:
        raise StoreMismatch(
            f"store {store.path} holds views with mix {store.header.mix or 'none'}, the data mixes "
            f"{data_mixing(dataset) or 'nothing'}: verify with the data the store was made from"
        )


def _replayed_view(store: LogitStore, dataset: DatasetWithIDs, epoch: int, position: int, record) -> torch.Tensor:
    """The view (C, H, W) that `record` (of `position` in `epoch`) says the teacher saw, rebuilt from
    the images and the store: the evaluation view, the augmented view of the record's seed, or that
    view mixed with the partner's view of the partner's stored seed."""
    image = dataset.load_image(position)
    if store.header.mode == "static":
        return dataset.transform(image)
    seed = int(record["seed"])
    view = dataset.transform(image, seed)
    if not store.header.mix or int(record["partner"]) == position:
        return view
    partner = int(record["partner"])
    partner_seed = int(store.records(epoch, [partner])["seed"][0])
    partner_view = dataset.transform(dataset.load_image(partner), partner_seed)
    mixed, _ = dataset.mix(view, partner_view, dataset.targets[position], dataset.targets[partner], seed, partner_seed)
    return mixed


# ----------------------------------------------------------------------------- what a store holds


def topk_mass(logits: torch.Tensor, ks: list[int], temperature: float = TEMPERATURE) -> list[float]:
    """Mean probability held by the k largest classes, for each k, at `temperature`. logits: (N, C).

    Raises:
        ValueError: a k outside 1..C or a temperature that is not positive.
    """
    bad = [k for k in ks if not 1 <= k <= logits.shape[1]] + ([temperature] if not temperature > 0 else [])
    if bad:
        raise ValueError(f"topk_mass: {bad} out of range (k in 1..{logits.shape[1]}, T > 0)")
    probs = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    cumulative = probs.cumsum(dim=-1).mean(dim=0)  # (C,)
    return [float(cumulative[k - 1]) for k in ks]


def topk_fidelity(logits: torch.Tensor, ks: list[int], temperatures: list[float]) -> list[dict]:
    """How far the distribution a k-record rebuilds is from the teacher's, for each k and T.

    Each row of `logits` (N, C) is encoded as a store record (`encode_records`: top-k logits in fp16
    and the remainder) and rebuilt (`rebuild_logits`); at temperature T the rows compare
    p = softmax(z / T) with p̂ = softmax(ẑ / T). Returns one dict per (k, T): k, temperature, the
    mean KL(p ‖ p̂) in nats, the mean total variation ½ Σ|p − p̂| (0: the same distribution, 1:
    disjoint), and the mean probability the teacher puts outside the top k (`tail_mass`).

    When is p̂ = p? The top k keep their logits and every other class gets the log-mean-exp of the
    tail's logits, so at T = 1 the tail's total mass is exact and only its shape is lost: p̂ = p when
    the tail is uniform, in particular when k >= C - 1 (a tail of one class, or none). At T != 1 the
    tail's mass is wrong as well: (C - k) exp(mean-exp / T) differs from the sum of exp(z_j / T)
    unless the tail's logits are equal (by the power-mean inequality the rebuilt tail is too heavy
    at T > 1 and too light at T < 1). Apart from that, the fp16 rounding of the kept logits (|Δz| <=
    |z| / 2048) is the only difference.

    Raises:
        ValueError: a k outside 1..C or a temperature that is not positive.
    """
    num_classes = logits.shape[1]
    bad = [k for k in ks if not 1 <= k <= num_classes] + [t for t in temperatures if not t > 0]
    if bad:
        raise ValueError(f"topk_fidelity: {bad} out of range (k in 1..{num_classes}, T > 0)")
    logits = logits.detach().float().cpu()
    rows = []
    for k in ks:
        rebuilt = rebuild_logits(encode_records(logits, [0] * len(logits), k), num_classes)
        for temperature in temperatures:
            log_p = F.log_softmax(logits.double() / temperature, dim=-1)
            log_q = F.log_softmax(rebuilt.double() / temperature, dim=-1)
            p = log_p.exp()
            kl = (p * (log_p - log_q)).sum(-1).clamp(min=0.0)
            tv = 0.5 * (p - log_q.exp()).abs().sum(-1)
            tail = 1.0 - p.sort(dim=-1, descending=True).values[:, :k].sum(-1)
            row = dict(k=k, temperature=temperature, kl=kl.mean().item(), tv=tv.mean().item())
            rows.append(dict(row, tail_mass=tail.clamp(min=0.0).mean().item()))
    return rows


def storage_comparison(store: LogitStore, *, sample: int = 2000) -> list[dict]:
    """Bytes per image for one epoch of teacher output, stored four ways.

    'this store' is measured on disk; 'official record' is the official 4 + 4k format;
    'dense fp32 logits' keeps every class; 'a pickle of top-k lists' is measured by pickling, in
    memory, the naive layout this project's first design proposed (a dict from string ID to
    (k values, k indices) as Python lists) for `sample` records. The pickle is never written or loaded.
    """
    import pickle  # measuring the naive layout's size only: this project never writes pickles

    header = store.header
    n = min(sample, header.size)
    records = store.records(0, np.arange(n))
    original_layout = {
        f"{header.dataset['split']}/{i:06d}": (
            records["value"][i].astype(float).tolist(),
            records["index"][i].astype(int).tolist(),
        )
        for i in range(n)
    }
    on_disk = sum((store.path / f"epoch-{e:04d}.bin").stat().st_size for e in range(header.epochs))
    return [
        dict(
            format="this store (top-k logits + remainder + seed)",
            bytes_per_image=on_disk / (header.size * header.epochs),
        ),
        dict(format=f"official record (4 + 4k, k={header.k})", bytes_per_image=official_record_bytes(header.k)),
        dict(format=f"dense fp32 logits ({header.num_classes} classes)", bytes_per_image=4 * header.num_classes),
        dict(format="a pickle of top-k lists by ID (naive)", bytes_per_image=len(pickle.dumps(original_layout)) / n),
    ]


def precompute_or_reuse(
    teacher: nn.Module,
    dataset: DatasetWithIDs,
    path: str | Path,
    *,
    k: int,
    mode: str = "static",
    epochs: int = 1,
    teacher_name: str = "teacher",
    batch_size: int = 256,
    force: bool = False,
    spec: DataSpec | None = None,
    **kwargs,
) -> tuple[LogitStore, PrecomputeStats | None]:
    """The store at `path` if it was made by this teacher, on this data, with these settings;
    otherwise (or with `force`) it is removed and computed again. Stats are None when reused. The
    arguments are checked before anything is removed, and only a store is removed (`remove_store`).

    Raises:
        LockHeld: another process is writing a store at `path`.
        ValueError: `path` holds files that are not a store's, and what `precompute` raises.
    """
    path = Path(path)
    _check_precompute_arguments(dataset, mode, kwargs.get("num_workers", 0))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if spec is not None:
        _check_spec_describes(spec, dataset)
    expected = store_header(teacher, teacher_name, dataset, k=k, mode=mode, epochs=epochs, spec=spec)
    if not force and (path / "manifest.json").exists():
        try:
            return LogitStore.open(path, expect=expected), None
        except StoreMismatch:
            pass  # made by another teacher or for other data: rebuild below
    found = read_pending(path)  # an unfinished precompute with the same settings is resumed instead
    settings = pending_settings(expected, batch_size=batch_size, world_size=rank_world()[1])
    if force or (path / "manifest.json").exists() or (found is not None and found != settings):
        remove_store(path)
    return precompute(
        teacher,
        dataset,
        path,
        k=k,
        mode=mode,
        epochs=epochs,
        teacher_name=teacher_name,
        batch_size=batch_size,
        spec=spec,
        **kwargs,
    )
