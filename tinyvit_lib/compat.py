"""The original plan's API, kept so that code written against it keeps working: the data loaders
`get_CIFAR_100`, `get_ImageNet1K` and `get_imagenet_subset_loaders`, and `FastDistillation`, the
fast-distillation workflow in one object. New code calls the pieces directly, as the trainer and the
notebooks do: `data.DataSpec` and `data.build`, `distill.precompute`, `distill.StoredTeacher` and
`distill.DistillationLoss`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .augment import AugmentConfig
from .data import DatasetWithIDs, get_dataset, make_loaders
from .distill import ALPHA, TEMPERATURE, TOP_K, DistillationLoss, StoredTeacher, precompute
from .logit_store import LogitStore

__all__ = ["get_CIFAR_100", "get_ImageNet1K", "get_imagenet_subset_loaders", "FastDistillation"]


def get_CIFAR_100(
    root: str | Path | None = None,
    *,
    batch_size: int = 128,
    img_size: int = 32,
    augment: AugmentConfig | None = AugmentConfig(),
    data_seed: int = 0,
    num_workers: int = 0,
    download: bool = True,
    verify: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """(train, test) loaders for CIFAR-100; see `get_dataset` and `make_loaders` for the arguments
    and what is raised."""
    train = get_dataset(
        "cifar100",
        root,
        "train",
        img_size=img_size,
        augment=augment,
        data_seed=data_seed,
        download=download,
        verify=verify,
    )
    test = get_dataset("cifar100", root, "test", img_size=img_size, download=download, verify=verify)
    return make_loaders(train, test, batch_size=batch_size, num_workers=num_workers)


def get_ImageNet1K(
    root: str | Path,
    *,
    batch_size: int = 128,
    img_size: int = 224,
    augment: AugmentConfig | None = AugmentConfig(),
    data_seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for an ImageNet-1k ImageFolder tree under `root`; see `get_dataset`."""
    train = get_dataset("imagenet", root, "train", img_size=img_size, augment=augment, data_seed=data_seed)
    val = get_dataset("imagenet", root, "val", img_size=img_size)
    return make_loaders(train, val, batch_size=batch_size, num_workers=num_workers)


def get_imagenet_subset_loaders(
    root: str | Path,
    *,
    num_classes: int,
    max_per_class: int,
    batch_size: int = 128,
    img_size: int = 224,
    augment: AugmentConfig | None = AugmentConfig(),
    data_seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for the first `num_classes` classes of an ImageNet tree, at most
    `max_per_class` images per class in each split (`get_dataset`'s files_per_class); see `get_dataset`."""
    subset = dict(num_classes=num_classes, files_per_class=max_per_class, img_size=img_size)
    train = get_dataset("imagenet-subset", root, "train", augment=augment, data_seed=data_seed, **subset)
    val = get_dataset("imagenet-subset", root, "val", **subset)
    return make_loaders(train, val, batch_size=batch_size, num_workers=num_workers)


class FastDistillation:
    """The fast-distillation workflow in one object: precompute a teacher's sparse logits once,
    then compute the distillation loss of any student batch from them.

        fd = FastDistillation(k=10, temperature=1.0, alpha=0.5)
        fd.precompute_logits(teacher, eval_train_set, "logits/fmnist")      # once
        fd.load("logits/fmnist", train_set)                                # in every student run
        loss = fd.compute_loss(student_logits, sample_ids, labels, epoch)

    Raises:
        ValueError: as `DistillationLoss` for alpha/temperature; `compute_loss` before `load`.
    """

    def __init__(
        self, k: int = TOP_K, temperature: float = TEMPERATURE, alpha: float = ALPHA, label_smoothing: float = 0.0
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.k = k
        self.loss = DistillationLoss(alpha, temperature, label_smoothing)
        self.teacher: StoredTeacher | None = None

    def precompute_logits(
        self, teacher: nn.Module, dataset: DatasetWithIDs, path: str | Path, *, mode: str = "static", **kwargs
    ) -> LogitStore:
        """Write the store at `path` (see `precompute` for the options and what is raised)."""
        store, _ = precompute(teacher, dataset, path, k=self.k, mode=mode, **kwargs)
        return store

    def load(self, path: str | Path, dataset: DatasetWithIDs) -> FastDistillation:
        """Open the store at `path` for training on `dataset` (checked against the store).

        Raises:
            ValueError: the store keeps another k than this object's (`derive_smaller_k` makes a
                smaller k from a larger one); as `StoredTeacher.open` otherwise.
        """
        teacher = StoredTeacher.open(path, dataset)
        if teacher.store.header.k != self.k:
            raise ValueError(
                f"logit store {path} keeps k={teacher.store.header.k}, this FastDistillation k={self.k} "
                "(derive_smaller_k makes a smaller k from a store's larger one)"
            )
        self.teacher = teacher
        return self

    def compute_loss(
        self, student_logits: torch.Tensor, sample_ids: torch.Tensor, labels: torch.Tensor, epoch: int = 0
    ) -> torch.Tensor:
        """The distillation loss of a student batch: `student_logits` (B, C), the batch's `sample_ids`
        and `labels` (B,), and the `epoch` whose stored views the batch shows (replay stores).

        Raises:
            ValueError: no store loaded yet, or as `StoredTeacher.logits_for_ids` and `DistillationLoss`.
        """
        if self.teacher is None:
            raise ValueError("load a logit store first (FastDistillation.load)")
        teacher_logits = self.teacher.logits_for_ids(sample_ids, epoch, student_logits.device)
        return self.loss(student_logits, labels, teacher_logits)
