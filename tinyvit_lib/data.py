"""The course's datasets with permanent sample IDs, dataset fingerprints, and data loaders.

Sample IDs. Every dataset has `ids: list[str]`, one permanent string per image, in a fixed order:

    array datasets (fashion-mnist, cifar100, synthetic)   "{split}/{index:06d}", index in the
                                                          official split file
    folder datasets (imagenet, imagenet-subset)           "{split}/{class}/{file}", the path
                                                          relative to root; class folders in
                                                          sorted order, files sorted within each

Items are `(image, label, sample_id)` with `sample_id` the int position in `ids` (an int64 after
the default collate, ready to key a logit store). `ids[sample_id]` is the permanent string; the
int means the same image on every machine because `fingerprint()` pins the ordered ID list and
the content. IDs are positions or paths, so they are unique even where images are identical
(Fashion-MNIST holds a few exact duplicates): nothing is merged.

Augmentation seeds come from the string ID (`augment.sample_seed(data_seed, epoch, ids[i])`), so a
sample gets the same view whether it is read from the full dataset or from a subset.

Where the data lives (`get_dataset`'s `root`):

    fashion-mnist        a given root is the only place looked in: the IDX files in it or in
                         root/FashionMNIST/raw; it must be an existing folder, downloads go there.
                         No root: Debian's FASHION_MNIST_DEBIAN_DIR, else a download into DEFAULT_ROOT
    cifar100             root/cifar-100-python, downloaded there (root defaults to DEFAULT_ROOT)
    imagenet(-subset)    root/train/<class>/... and root/val/<class>/... with the same class folders
                         (root required); links are followed except into a folder that contains
                         them (a loop), and an image reached by two paths is refused (`_scan_folder`)

Options of `get_dataset` that apply to some datasets only (the others refuse num_classes,
files_per_class and num_samples, and ignore verify and check_images):

    num_classes          imagenet-subset (required): the first N class folders in sorted order;
                         synthetic: the number of classes (default 10)
    files_per_class      imagenet-subset (required): at most M image files per class, the first in
                         sorted order: a cut of the folder scan (the labelled set of a run is
                         `per_class_subset`'s max_per_class, taken after the validation carve)
    num_samples          synthetic: the number of images (default 1024 train / 256 test)
    verify               cifar100: refuse files whose md5 differs from the official release
    check_images         image folders: "header" (each file non-empty and starting like a JPEG, PNG,
                         GIF, BMP, TIFF, PPM/PGM or WebP file), "decode" (in full, slow) or "off"

Training views (`augment`) never flip an image horizontally where a mirror image changes the class
(synthetic).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import operator
import os
import pickle  # only for its exception type: torchvision reads the CIFAR files
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity

from .augment import (
    AUGMENT_PRESETS,
    MIX_PRESETS,
    AugmentConfig,
    EvalTransform,
    MixConfig,
    PairMix,
    TrainTransform,
    derive_seed,
    mix_partners,
    sample_seed,
)
from .utils import atomic_write_text, check_integer

__all__ = [
    "DATASETS",
    "DataSpec",
    "STORE_FIELDS",
    "build",
    "training_set",
    "dataset_channels",
    "dataset_normalisation",
    "write_image_folder",
    "dataset_eval_crop",
    "validation_set",
    "test_set",
    "DatasetWithIDs",
    "ArrayDatasetWithIDs",
    "FolderDatasetWithIDs",
    "EpochShuffleSampler",
    "SubsetWithIDs",
    "per_class_subset",
    "validation_indices",
    "carve_validation",
    "training_images",
    "get_dataset",
    "make_loaders",
    "FASHION_MNIST_DEBIAN_DIR",
    "DEFAULT_ROOT",
    "MIN_IMG_SIZE",
    "MAX_IMG_SIZE",
    "CHECK_IMAGES",
]

# (uint8 image (C, H, W), seed) -> tensor; a transform may also have `batch(images, seeds)` -> (B, C, H', W')
Transform = Callable[[torch.Tensor, int], torch.Tensor]

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
DEFAULT_ROOT = Path.home() / ".cache" / "tinyvit_lib"  # where downloads go when no root is given
# TinyViT's stem and three patch merges shrink the side 32x (224 -> stage maps 56, 28, 14, 7). 16 is the
# smallest power of two at which its first attention stage still mixes more than one token (maps 4, 2,
# 1, 1; at 8 they are 2, 1, 1, 1), and it admits Fashion-MNIST's own 28.
MIN_IMG_SIZE = 16
# The paper's largest is 512. At 1024 one float32 batch of 128 RGB images takes 1.6 GB; at 10,000 it
# would take 154 GB before the model runs: refused before anything is allocated.
MAX_IMG_SIZE = 1024
CHECK_IMAGES = ("header", "decode", "off")  # get_dataset's check of image files, from cheap to none


@dataclass(frozen=True)
class _Facts:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, str]  # (training split, held-out split)
    img_size: int  # the course's default resolution
    hflip: bool  # whether a mirror image keeps its class
    eval_crop_pct: float = 1.0


_IMAGENET_FACTS = _Facts((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ("train", "val"), 224, True, 0.875)
_FACTS = {
    # Clothing keeps its class when mirrored (shoes all face left; flipped they face right).
    "fashion-mnist": _Facts((0.2860,), (0.3530,), ("train", "test"), 32, True),
    "cifar100": _Facts((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), ("train", "test"), 32, True),
    "imagenet": _IMAGENET_FACTS,
    "imagenet-subset": _IMAGENET_FACTS,
    # Synthetic classes are position-dependent colour layouts: a mirror image is another pattern.
    "synthetic": _Facts((0.5, 0.5, 0.5), (0.3, 0.3, 0.3), ("train", "test"), 32, False),
}
DATASETS = tuple(_FACTS)
_SPLIT_ALIASES = {"val": "test", "test": "val"}  # the held-out split answers to either name
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_SYNTHETIC_SEED = 20220725  # fixed: the synthetic dataset is the same everywhere
_FOLDER_DATASETS = ("imagenet", "imagenet-subset")
_MAX_NAMED = 10  # names listed in one error message before "and N more"
# How the files of each format Pillow decodes among torchvision's IMG_EXTENSIONS begin, as Pillow's own
# `_accept` tests them (plus GIF: Pillow decodes it under any file name). WebP is matched apart.
_IMAGE_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00"),
    "PPM/PGM": tuple(b"P" + bytes([kind]) for kind in b"0123456fy"),
}
_IMAGE_PREFIXES = tuple(prefix for prefixes in _IMAGE_MAGIC.values() for prefix in prefixes)


class _IdentifiedSamples(Dataset):
    """The identity of a dataset's samples: permanent string IDs (see the module docstring), labels,
    class names, the stored images, and a fingerprint of them all.

    Subclasses provide `load_image(index)` and `_hash_content(digest)` (and `load_images` where the
    images stack into one batch).

    Raises:
        ValueError: `ids` and `targets` of different lengths, or IDs that are not unique.
    """

    def __init__(self, *, name: str, split: str, ids: list[str], targets: list[int], classes: list[str]) -> None:
        if len(ids) != len(targets):
            raise ValueError(f"{len(ids)} ids but {len(targets)} labels")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}/{split}: sample IDs are not unique")
        self.name, self.split = name, split
        self.ids, self.targets, self.classes = ids, targets, classes

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_image(self, index: int) -> torch.Tensor:
        """The stored image, uint8 (C, H, W), before any transform."""
        raise NotImplementedError

    def load_images(self, indices: list[int]) -> torch.Tensor | None:
        """The stored images at `indices` as one uint8 batch (B, C, H, W), or None where images
        differ in size (files)."""
        return None

    def fingerprint(self) -> dict[str, str | int]:
        """Cheap identity of the data: name, split, size, classes, a hash of the ordered ID list and a
        hash of the content (labels and class names, plus the image bytes for array datasets or the
        file sizes for folder datasets: a file rewritten at the same size goes unnoticed there). Equal
        fingerprints mean every int sample_id names the same image. Recomputed on each call (it reads
        every image of an array dataset, and makes one stat() per file for folders)."""
        content = hashlib.sha256()
        content.update(np.asarray(self.targets, dtype="<i8").tobytes())
        content.update("\n".join(self.classes).encode())
        self._hash_content(content)
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest(),
            "content_sha256": content.hexdigest(),
        }

    def _hash_content(self, digest: hashlib._Hash) -> None:
        raise NotImplementedError


class _SeededViews(_IdentifiedSamples):
    """The samples' views: `transform(image, seed)` receives the uint8 image (C, H, W) and the seed of
    the sample in the current epoch (`seed_for`), so a view depends on the image, `data_seed` and the
    epoch alone. `set_epoch` writes to shared memory, so it also reaches persistent DataLoader workers
    when it is called before the epoch's iterator is created. `out_chans` is where a grayscale view is
    repeated to 3 channels (`_to_out_chans`), so a 1-channel student and an RGB teacher see the same
    pixels.

    Raises:
        ValueError: `ids` and `targets` of different lengths, or IDs that are not unique.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        ids: list[str],
        targets: list[int],
        classes: list[str],
        transform: Transform,
        out_chans: int,
        data_seed: int = 0,
    ) -> None:
        super().__init__(name=name, split=split, ids=ids, targets=targets, classes=classes)
        self.transform, self.out_chans, self.data_seed = transform, out_chans, data_seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation seeds `__getitem__` uses (like DistributedSampler's)."""
        self._epoch.fill_(epoch)

    def seed_for(self, index: int, epoch: int | None = None) -> int:
        """The augmentation seed of sample `index` in `epoch` (default: the current epoch)."""
        return sample_seed(self.data_seed, self.epoch if epoch is None else epoch, self.ids[index])

    def views(self, indices: list[int], epoch: int) -> torch.Tensor:
        """The transformed images at `indices` in `epoch`, (B, C, H', W') (before any channel repeat):
        a batch at a time where the transform has `batch(images, seeds)`, as the course's transforms do."""
        seeds = [self.seed_for(i, epoch) for i in indices]
        if not hasattr(self.transform, "batch"):
            return torch.stack([self.transform(self.load_image(i), seed) for i, seed in zip(indices, seeds)])
        images = self.load_images(indices)
        return self.transform.batch(images if images is not None else [self.load_image(i) for i in indices], seeds)

    def _to_out_chans(self, views: torch.Tensor) -> torch.Tensor:
        """(..., C, H', W') -> (..., out_chans, H', W'): a grayscale view repeated to RGB (a view, no copy)."""
        if self.out_chans == 3 and views.shape[-3] == 1:
            return views.expand(*views.shape[:-3], 3, -1, -1)
        return views

    def _item(self, index: int) -> tuple[torch.Tensor, int, int]:
        """One unmixed item through a transform without `batch` (its outputs need not stack)."""
        image = self.transform(self.load_image(index), self.seed_for(index))  # (C, H', W')
        return self._to_out_chans(image), self.targets[index], index


class DatasetWithIDs(_SeededViews):
    """A dataset whose items are `(image, label, sample_id)`: its samples' identity (IDs, labels,
    classes, fingerprint: `_IdentifiedSamples`), their views per epoch (`_SeededViews`), and here the
    items themselves, a batch at a time, with views mixed in pairs when `mix` is set.

    Mixing (`mix`, an `augment.PairMix`, set by `get_dataset(..., mix=...)`): each view is mixed with
    its partner's, the partner drawn per epoch over `pair_root()` (`partners`), and the label becomes
    the mixed view's soft target, float (num_classes,).

    Raises:
        ValueError: `ids` and `targets` of different lengths, or IDs that are not unique.
    """

    mix: PairMix | None = None  # Mixup/CutMix with a partner drawn per epoch (set by `get_dataset(mix=...)`)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor, int]:
        """(image, label, sample_id); sample_id == index, never negative. With `mix`, the label is the
        mixed view's soft target, float (num_classes,).

        Raises:
            IndexError: index outside [0, len).
        """
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int | torch.Tensor, int]]:
        """`[self[i] for i in indices]`, computed a batch at a time: a DataLoader calls this for each
        batch. With `mix`, each view is mixed with its partner's view (`mix_partners` over
        `pair_root()`, the same partner whatever the batch) and the label is the soft target.

        Raises:
            IndexError: an index outside [0, len).
            TypeError: an index that is not an integer (a float is not rounded).
        """
        indices = [operator.index(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"index={bad[0]} outside [0, {len(self)})")
        if not indices:
            return []
        if self.mix is None and not hasattr(self.transform, "batch"):  # any callable: one item at a time
            return [self._item(i) for i in indices]
        epoch = self.epoch
        views = self.views(indices, epoch)  # (B, C, H', W')
        labels: list = [self.targets[i] for i in indices]
        if self.mix is not None:
            views, labels = self._mixed(indices, views, epoch)
        return [(view, label, i) for view, label, i in zip(self._to_out_chans(views), labels, indices)]

    def pair_root(self) -> tuple[DatasetWithIDs, list[int] | None]:
        """The dataset that mixing partners come from (a subset's parent, up the chain: a subset's
        samples pair as they do in the whole set) and this dataset's positions in it (None: itself)."""
        return self, None

    def partners(self, indices: list[int], epoch: int) -> list[int]:
        """The positions in `pair_root()` of the partners of the samples at `indices` in `epoch`."""
        root, positions = self.pair_root()
        own = indices if positions is None else [positions[i] for i in indices]
        return mix_partners(len(root), self.data_seed, epoch)[own].tolist()

    def _mixed(self, indices: list[int], views: torch.Tensor, epoch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each view mixed with its partner's: (B, C, H', W') and B soft targets (num_classes,)."""
        root, positions = self.pair_root()
        partners = self.partners(indices, epoch)
        partner_views = root.views(partners, epoch)
        mixed, targets = [], []
        for b, (i, p) in enumerate(zip(indices, partners)):
            own = i if positions is None else positions[i]
            if p == own:  # an odd-sized set leaves one sample unpaired: its view stays as it is
                view, target = views[b], F.one_hot(torch.tensor(self.targets[i]), self.num_classes).to(views.dtype)
            else:
                view, target = self.mix(
                    views[b],
                    partner_views[b],
                    self.targets[i],
                    root.targets[p],
                    self.seed_for(i, epoch),
                    root.seed_for(p, epoch),
                )
            mixed.append(view)
            targets.append(target)
        return torch.stack(mixed), targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, split={self.split!r}, size={len(self)}, transform={self.transform})"
        )


class ArrayDatasetWithIDs(DatasetWithIDs):
    """Images held in memory as one uint8 tensor (N, C, H, W); IDs are "{split}/{index:06d}"."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: list[int],
        *,
        name: str,
        split: str,
        classes: list[str],
        transform: Transform,
        out_chans: int,
        data_seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        ids = [f"{split}/{i:06d}" for i in range(images.shape[0])]
        super().__init__(
            name=name,
            split=split,
            ids=ids,
            targets=targets,
            classes=classes,
            transform=transform,
            out_chans=out_chans,
            data_seed=data_seed,
        )
        self.images = images.contiguous()

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]  # (C, H, W)

    def load_images(self, indices: list[int]) -> torch.Tensor:
        return self.images[indices]  # (B, C, H, W)

    def _hash_content(self, digest: hashlib._Hash) -> None:
        digest.update(memoryview(self.images.numpy()))


class FolderDatasetWithIDs(DatasetWithIDs):
    """Image files under `root`, decoded on access as RGB by Pillow (as torchvision's ImageFolder
    does); IDs are paths relative to `root`."""

    def __init__(
        self,
        root: Path,
        ids: list[str],
        targets: list[int],
        *,
        name: str,
        split: str,
        classes: list[str],
        transform: Transform,
        out_chans: int,
        data_seed: int = 0,
    ) -> None:
        super().__init__(
            name=name,
            split=split,
            ids=ids,
            targets=targets,
            classes=classes,
            transform=transform,
            out_chans=out_chans,
            data_seed=data_seed,
        )
        self.root = root

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 (3, H, W).

        Raises:
            FileNotFoundError: the file is gone.
            ValueError: the file cannot be decoded; the message names it.
        """
        pixels = _read_rgb(self.root / self.ids[index])  # (H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def _hash_content(self, digest: hashlib._Hash) -> None:
        sizes = [(self.root / sample_id).stat().st_size for sample_id in self.ids]
        digest.update(np.asarray(sizes, dtype="<i8").tobytes())


class SubsetWithIDs(DatasetWithIDs):
    """Some samples of another dataset (`indices` into it, in its order). IDs, labels, transform and
    augmentation seeds are the parent's, so a sample looks the same in both; `sample_id` is the
    position in this subset, and `ids[sample_id]` the parent's permanent string."""

    def __init__(self, parent: DatasetWithIDs, indices: list[int], *, pairs_within: bool = False) -> None:
        super().__init__(
            name=parent.name,
            split=parent.split,
            ids=[parent.ids[i] for i in indices],
            targets=[parent.targets[i] for i in indices],
            classes=parent.classes,
            transform=parent.transform,
            out_chans=parent.out_chans,
            data_seed=parent.data_seed,
        )
        self.parent, self.indices = parent, list(indices)
        self.mix = parent.mix
        self.pairs_within = pairs_within  # True: mixing partners come from this subset only (see pair_root)

    def load_image(self, index: int) -> torch.Tensor:
        return self.parent.load_image(self.indices[index])

    def pair_root(self) -> tuple[DatasetWithIDs, list[int] | None]:
        if self.pairs_within:
            return self, None
        root, positions = self.parent.pair_root()
        return root, self.indices if positions is None else [positions[i] for i in self.indices]

    def load_images(self, indices: list[int]) -> torch.Tensor | None:
        return self.parent.load_images([self.indices[i] for i in indices])

    def _hash_content(self, digest: hashlib._Hash) -> None:
        digest.update(self.parent.fingerprint()["content_sha256"].encode())
        digest.update(np.asarray(self.indices, dtype="<i8").tobytes())


def per_class_subset(dataset: DatasetWithIDs, max_per_class: int, *, pairs_within: bool = False) -> SubsetWithIDs:
    """The first `max_per_class` samples of every class, in ID order: the same subset on every machine.
    `pairs_within`: mixed views pair within the subset (else as in `dataset`, see `pair_root`).

    Raises:
        ValueError: max_per_class not an integer, or below 1.
    """
    check_integer("max_per_class", max_per_class, low=1)
    taken = [0] * dataset.num_classes
    indices = []
    for index, label in enumerate(dataset.targets):
        if taken[label] < max_per_class:
            taken[label] += 1
            indices.append(index)
    return SubsetWithIDs(dataset, indices, pairs_within=pairs_within)


def validation_indices(dataset: DatasetWithIDs, per_class: int) -> list[int]:
    """Positions (ascending) of the validation images carved from a training split: in every class,
    the `per_class` images whose permanent IDs hash lowest (sha256 of "validation/" + ID). The choice
    depends on the IDs alone, so it is the same on every machine, in any order, and for any subset
    that holds the same images.

    Raises:
        ValueError: per_class < 1, or a class with no more than `per_class` images (it would leave the
            pool without that class; the class and its count are named).
    """
    if per_class < 1:
        raise ValueError(f"val_per_class={per_class} must be >= 1")
    by_class: list[list[int]] = [[] for _ in range(dataset.num_classes)]
    for index, label in enumerate(dataset.targets):
        by_class[label].append(index)
    chosen = []
    for label, members in enumerate(by_class):
        if len(members) <= per_class:
            raise ValueError(
                f"val_per_class={per_class}: class {dataset.classes[label]!r} has {len(members)} training "
                f"image(s); the pool must keep at least one"
            )
        rank = sorted(members, key=lambda i: hashlib.sha256(f"validation/{dataset.ids[i]}".encode()).digest())
        chosen += rank[:per_class]
    return sorted(chosen)


def carve_validation(dataset: DatasetWithIDs, per_class: int) -> tuple[SubsetWithIDs, SubsetWithIDs]:
    """(pool, validation) of a training split: `validation_indices` held out, the rest the pool. Both
    pair mixed views within themselves, so a validation image is never a training image's partner.
    Call it on the augmented split for the pool and on the evaluation-view split for validation.

    Raises:
        ValueError: as `validation_indices`.
    """
    held_out = validation_indices(dataset, per_class)
    taken = set(held_out)
    pool = [i for i in range(len(dataset)) if i not in taken]
    return SubsetWithIDs(dataset, pool, pairs_within=True), SubsetWithIDs(dataset, held_out, pairs_within=True)


def training_images(
    dataset: DatasetWithIDs, *, val_per_class: int | None = None, max_per_class: int | None = None
) -> DatasetWithIDs:
    """What a run trains on (or a store covers): the training split, without its validation carve
    when `val_per_class` (the pool), cut to its first `max_per_class` images per class. Under a carve
    the labelled subset pairs mixed views within itself (the images its student sees).

    Raises:
        ValueError: as `validation_indices` and `per_class_subset`.
    """
    if val_per_class:
        dataset, _ = carve_validation(dataset, val_per_class)
    if max_per_class:
        dataset = per_class_subset(dataset, max_per_class, pairs_within=bool(val_per_class))
    return dataset


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """A run's data as one value: which images, at what size, in which views, and how they are
    checked on the way in. `build(spec)` makes the datasets; a logit store records the spec it was
    written from (`for_store`), so a student and its store agree by construction.

    Raises:
        ValueError: an unknown dataset, augmentation, mixing preset or check_images, a mix without
            an augmentation, a count below 1, or a count, size or seed that is not an integer (each
            names the value).
    """

    dataset: str = "fashion-mnist"  # a name of DATASETS
    root: str | None = None  # where the data lives (see the module docstring); None: the dataset's default
    img_size: int | None = None  # None: the dataset's own resolution (32 or 224), filled in here
    augment: str = "light"  # a key of augment.AUGMENT_PRESETS; "none": the evaluation view
    mix: str | None = None  # a key of augment.MIX_PRESETS: views mixed in pairs; None: not mixed
    max_per_class: int | None = None  # the labelled set: the first N images per class of the pool
    val_per_class: int | None = None  # validation carved from the training split, per class (None: held-out split)
    max_val_per_class: int | None = None  # validate each epoch on this many images per class of validation
    data_seed: int = 0  # the seed of the views and of the mixing partners (a replay store fixes it)
    verify_files: bool = True  # cifar100: refuse files whose md5 differs from the official release
    check_images: str = "header"  # image folders: how each file is checked ("header", "decode", "off")

    def __post_init__(self) -> None:
        if self.dataset not in _FACTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.dataset == "imagenet-subset":
            raise ValueError(
                "dataset='imagenet-subset' needs num_classes and files_per_class, which a DataSpec does not hold: "
                "use dataset='imagenet' (the imagenet-subset profile does), or get_dataset for the subset"
            )
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augment preset {self.augment!r}; choose one of {sorted(AUGMENT_PRESETS)}")
        if self.mix is not None and self.mix not in MIX_PRESETS:
            raise ValueError(f"unknown mix preset {self.mix!r}; choose one of {sorted(MIX_PRESETS)}")
        if self.mix is not None and AUGMENT_PRESETS[self.augment] is None:
            raise ValueError(f"mix={self.mix!r} mixes augmented views: choose an augment other than 'none'")
        if self.check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images={self.check_images!r}; choose one of {', '.join(CHECK_IMAGES)}")
        for name in ("max_per_class", "val_per_class", "max_val_per_class"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), low=1)
        check_integer("data_seed", self.data_seed)  # a float seed would give other views under an equal spec
        if self.img_size is not None:
            check_integer("img_size", self.img_size)
        if self.img_size is None:
            object.__setattr__(self, "img_size", _FACTS[self.dataset].img_size)
        if isinstance(self.root, str | os.PathLike):  # one spelling per folder: "./d/", "d" and "d/." are "d"
            object.__setattr__(self, "root", os.path.normpath(self.root))

    def for_store(self) -> dict:
        """What a logit store records of the spec: the fields that decide its images and views (not
        where the files live, nor how they were checked)."""
        return {name: getattr(self, name) for name in STORE_FIELDS}


# The DataSpec fields a store records and a student's spec must match (`distill.store_spec_differences`).
STORE_FIELDS = ("dataset", "img_size", "augment", "mix", "max_per_class", "val_per_class", "data_seed")


def dataset_channels(name: str) -> int:
    """The channel count of dataset `name`'s images (1: grayscale).

    Raises:
        ValueError: an unknown dataset.
    """
    if name not in _FACTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return len(_FACTS[name].mean)


def dataset_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) that dataset `name`'s transforms normalise its images with.

    Raises:
        ValueError: an unknown dataset.
    """
    if name not in _FACTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return tuple(_FACTS[name].mean), tuple(_FACTS[name].std)


def dataset_eval_crop(name: str) -> float:
    """The share of the image the evaluation view keeps: resize the shorter side to img_size / crop,
    then center-crop img_size (1.0: resize only; ImageNet-style folders 0.875).

    Raises:
        ValueError: an unknown dataset.
    """
    if name not in _FACTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _FACTS[name].eval_crop_pct


def write_image_folder(
    name: str, root: str | Path, out: str | Path, *, per_class: int, held_out_per_class: int
) -> Path:
    """Write the first images of each class of dataset `name` (read from `root`) as PNG files in the
    layout every image-folder tool reads, `out/train/<class>/<id>.png` and `out/val/<class>/<id>.png`
    (the held-out split's): what a user's own folder looks like. A folder already complete with the
    same counts is kept as it is; one this function wrote with other counts is replaced whole (the
    new folder is written beside it, then renamed into place). Returns `out`.

    Raises:
        ValueError: an unknown dataset or an image-folder one as `name` (copy the folder instead),
            counts that are not integers >= 1, or an `out` that holds files this function did not
            write (no done.json): it is left as it is.
        FileNotFoundError: the dataset is not at `root`.
    """
    if name not in _FACTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in _FOLDER_DATASETS:
        raise ValueError(f"{name!r} is already an image folder: copy it instead")
    check_integer("per_class", per_class, low=1)
    check_integer("held_out_per_class", held_out_per_class, low=1)
    out = Path(out)
    done = out / "done.json"
    wanted = dict(dataset=name, per_class=per_class, held_out_per_class=held_out_per_class)
    if done.is_file() and json.loads(done.read_text()) == wanted:
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not done.is_file())):
        raise ValueError(f"{out} holds files that write_image_folder did not write (no done.json): choose another out")
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_image_splits(name, root, staging, per_class, held_out_per_class)
        atomic_write_text(staging / "done.json", json.dumps(wanted) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # empty, or this function's with other counts
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_image_splits(name: str, root: str | Path | None, out: Path, per_class: int, held_out_per_class: int) -> None:
    """The PNG files of `write_image_folder`, into `out`."""
    for split, folder, count in (("train", "train", per_class), ("test", "val", held_out_per_class)):
        images, targets, classes = _load_arrays(
            name, root, split, download=False, verify=True, num_classes=None, num_samples=None
        )
        taken = {c: 0 for c in range(len(classes))}
        for index, label in enumerate(targets):
            if taken[label] == count:
                continue
            taken[label] += 1
            target = out / folder / _folder_name(classes[label]) / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = images[index].permute(1, 2, 0).numpy()  # (H, W, C) uint8
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(target)
            if all(n == count for n in taken.values()):
                break


def _folder_name(class_name: str) -> str:
    """A class name as a folder name: "T-shirt/top" -> "T-shirt_top"."""
    return "".join(c if c.isalnum() or c in "-_ " else "_" for c in class_name)


def build(spec: DataSpec) -> tuple[DatasetWithIDs, DatasetWithIDs]:
    """The datasets a run needs: (`training_set(spec)`, `validation_set(spec)` cut to
    `max_val_per_class` images per class).

    Raises:
        ValueError, FileNotFoundError: as `get_dataset`, `training_images` and `carve_validation`.
    """
    train, val = training_set(spec), validation_set(spec)
    if spec.max_val_per_class:
        val = per_class_subset(val, spec.max_val_per_class)
    return train, val


def training_set(spec: DataSpec) -> DatasetWithIDs:
    """The images `spec` trains on (or a store covers), in its views: the training split without the
    validation carve, cut to `max_per_class`, augmented and mixed as the spec says.

    Raises:
        ValueError, FileNotFoundError: as `get_dataset` and `training_images`.
    """
    augment = AUGMENT_PRESETS[spec.augment]
    mix = MIX_PRESETS[spec.mix] if spec.mix else None
    checks = _file_checks(spec)
    train = get_dataset(
        spec.dataset,
        spec.root,
        "train",
        img_size=spec.img_size,
        augment=augment,
        mix=mix,
        data_seed=spec.data_seed,
        **checks,
    )
    return training_images(train, val_per_class=spec.val_per_class, max_per_class=spec.max_per_class)


def validation_set(spec: DataSpec) -> DatasetWithIDs:
    """The whole validation set of `spec`, in the evaluation view: its carve from the training split
    (`val_per_class`), or the held-out split when it has none.

    Raises:
        ValueError, FileNotFoundError: as `get_dataset` and `carve_validation`.
    """
    if not spec.val_per_class:
        return get_dataset(spec.dataset, spec.root, "val", img_size=spec.img_size, **_file_checks(spec))
    plain = get_dataset(spec.dataset, spec.root, "train", img_size=spec.img_size, **_file_checks(spec))
    return carve_validation(plain, spec.val_per_class)[1]


def test_set(spec: DataSpec) -> DatasetWithIDs:
    """The held-out split, for final numbers only. It is a test set only for a spec that validates on
    a carve of the training split, so that nothing was chosen on it.

    Raises:
        ValueError: `spec.val_per_class` is not set (validation is the held-out split itself).
        FileNotFoundError: as `get_dataset`.
    """
    if not spec.val_per_class:
        raise ValueError(
            f"val_per_class={spec.val_per_class}: this data validates on the held-out split, so its numbers "
            "there are not test numbers; carve a validation set (val_per_class) and rerun"
        )
    return get_dataset(spec.dataset, spec.root, "test", img_size=spec.img_size, **_file_checks(spec))


test_set.__test__ = False  # a function named test_*, not a test: pytest must not collect it when imported


def _file_checks(spec: DataSpec) -> dict:
    return dict(verify=spec.verify_files, check_images=spec.check_images)


def get_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    augment: AugmentConfig | None = None,
    mix: MixConfig | None = None,
    transform: Transform | None = None,
    data_seed: int = 0,
    download: bool = True,
    verify: bool = True,
    num_classes: int | None = None,
    files_per_class: int | None = None,
    num_samples: int | None = None,
    check_images: str = "header",
) -> DatasetWithIDs:
    """Build one split of one of the course's datasets (`DATASETS`). Arguments are checked, and image
    folders scanned, before anything is allocated; nothing is written except by a download.

    Args:
        name, root: a name of DATASETS and where its data lives; see the module docstring, also for the
            options only some datasets take (verify, check_images, num_classes, files_per_class, num_samples).
        split: "train", or the held-out split under either name, "val" or "test".
        img_size: output resolution in [MIN_IMG_SIZE, MAX_IMG_SIZE] (default: the dataset's, 32 or 224).
        in_chans: 1 or 3 output channels (default: the data's own); 3 on a grayscale dataset repeats it.
        augment: training views (`TrainTransform`); None gives the deterministic `EvalTransform`.
        mix: mix every view with a partner's (`augment.PairMix`); items then carry soft targets.
        transform: instead of `augment`, any callable (uint8 image (C, H, W), seed) -> tensor.
        data_seed: the base of the per-sample augmentation seeds and of the mixing partners.
        download: allow a torchvision download when the files are not found (needs a network).

    Raises:
        ValueError: an unknown name, split or check_images, a bad in_chans/N/M, a non-integer data_seed, img_size
            outside [MIN_IMG_SIZE, MAX_IMG_SIZE], an option the dataset does not take, both `augment` and `transform`,
            `mix` without `augment` or mixing nothing, cifar100 files failing the md5 check; image folders: no root,
            val class folders unlike train's (named), an image reached twice, files failing `check_images`.
        TypeError: `mix` is not a MixConfig (nor None).
        FileNotFoundError: the data is not there (the message says how to get it), a missing root or a
            root that is not a folder, a missing split folder, or a class folder without images.
    """
    check_integer("data_seed", data_seed)
    facts, split, chans = _check_request(name, split, img_size=img_size, in_chans=in_chans, check_images=check_images)
    _check_mix(mix, augment)
    _check_options(name, num_classes=num_classes, files_per_class=files_per_class, num_samples=num_samples)
    transform = _pick_transform(facts, img_size, augment=augment, transform=transform)
    common = dict(name=name, split=split, transform=transform, out_chans=chans, data_seed=data_seed)
    if name in _FOLDER_DATASETS:
        ids, targets, classes, root = _find_folder_samples(
            name, root, split, num_classes=num_classes, files_per_class=files_per_class, check_images=check_images
        )
        dataset: DatasetWithIDs = FolderDatasetWithIDs(root, ids, targets, classes=classes, **common)
    else:
        images, targets, classes = _load_arrays(
            name, root, split, download=download, verify=verify, num_classes=num_classes, num_samples=num_samples
        )
        dataset = ArrayDatasetWithIDs(images, targets, classes=classes, **common)
    dataset.mix = PairMix(dataset.num_classes, mix) if mix is not None else None
    return dataset


def _check_request(
    name: str, split: str, *, img_size: int | None, in_chans: int | None, check_images: str
) -> tuple[_Facts, str, int]:
    """The dataset's facts, its canonical split name and its output channel count, once `get_dataset`'s
    name, split, img_size, in_chans and check_images have been checked.

    Raises:
        ValueError: see `get_dataset`.
    """
    if name not in _FACTS:
        raise ValueError(f"unknown dataset name={name!r}; choose one of {', '.join(DATASETS)}")
    facts = _FACTS[name]
    split = _canonical_split(name, split, facts)
    if img_size is not None and not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:
        raise ValueError(
            f"img_size={img_size} is outside [{MIN_IMG_SIZE}, {MAX_IMG_SIZE}], the sizes the course supports "
            "(MIN_IMG_SIZE and MAX_IMG_SIZE in tinyvit_lib/data.py say why); pick one in that range"
        )
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images={check_images!r}; choose one of {', '.join(map(repr, CHECK_IMAGES))}")
    native_chans = len(facts.mean)
    out_chans = native_chans if in_chans is None else in_chans
    if out_chans not in (native_chans, 3):
        raise ValueError(f"in_chans={in_chans} is not available for {name} (its images have {native_chans} channel(s))")
    return facts, split, out_chans


def _canonical_split(name: str, split: str, facts: _Facts) -> str:
    if split in facts.splits:
        return split
    if _SPLIT_ALIASES.get(split) == facts.splits[1]:
        return facts.splits[1]
    raise ValueError(f"unknown split={split!r} for {name}; choose 'train' or '{facts.splits[1]}'")


def _check_mix(mix: MixConfig | None, augment: AugmentConfig | None) -> None:
    """Raises TypeError where `mix` is not a MixConfig, ValueError where it comes without an
    augmentation (it mixes augmented views) or mixes nothing."""
    if mix is None:
        return
    if not isinstance(mix, MixConfig):
        raise TypeError(f"mix={mix!r} must be a MixConfig (e.g. augment.MIX_PRESETS['full']) or None")
    if augment is None:
        raise ValueError(f"mix={mix} mixes augmented views, but augment=None: pass an AugmentConfig too")
    if not mix.mixing:
        raise ValueError(
            f"mix={mix} mixes nothing (mix_prob=0, or both alphas 0): pass mix=None for views that are not mixed"
        )


def _check_options(name: str, **options: int | None) -> None:
    takes = {"imagenet-subset": {"num_classes", "files_per_class"}, "synthetic": {"num_classes", "num_samples"}}
    for option, value in options.items():
        if value is None:
            if name == "imagenet-subset" and option in takes[name]:
                raise ValueError(f"imagenet-subset needs {option} (got None)")
        elif option not in takes.get(name, set()):
            raise ValueError(f"{option}={value} does not apply to {name}")
        elif value < 1:
            raise ValueError(f"{option}={value} must be >= 1")


def _pick_transform(
    facts: _Facts, img_size: int | None, *, augment: AugmentConfig | None, transform: Transform | None
) -> Transform:
    """`transform`, else the dataset's evaluation or (given `augment`) training transform at `img_size`.

    Raises:
        ValueError: both `augment` and `transform`.
    """
    if augment is not None and transform is not None:
        raise ValueError("pass either augment (a config) or transform (a callable), not both")
    if transform is not None:
        return transform
    img_size = facts.img_size if img_size is None else img_size
    if augment is None:
        return EvalTransform(img_size, facts.mean, facts.std, crop_pct=facts.eval_crop_pct)
    config = augment if facts.hflip else replace(augment, hflip=0.0)
    return TrainTransform(img_size, facts.mean, facts.std, config=config)


def _load_arrays(
    name: str,
    root: str | Path | None,
    split: str,
    *,
    download: bool,
    verify: bool,
    num_classes: int | None,
    num_samples: int | None,
) -> tuple[torch.Tensor, list[int], list[str]]:
    """(N, C, H, W) uint8 images, labels and class names of an array dataset (all but the image folders)."""
    if name == "fashion-mnist":
        images, targets = _load_fashion_mnist(root, split, download)
        return images, targets, list(tv_datasets.FashionMNIST.classes)
    if name == "cifar100":
        cifar = _load_cifar100(root, split, download, verify)
        images = torch.from_numpy(cifar.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return images, list(cifar.targets), list(cifar.classes)
    num_samples = (1024 if split == "train" else 256) if num_samples is None else num_samples
    num_classes = 10 if num_classes is None else num_classes
    images, targets = _make_synthetic(split, num_samples, num_classes)
    return images, targets, [f"pattern {k}" for k in range(num_classes)]


# ----------------------------------------------------------------------------- Fashion-MNIST


def _load_fashion_mnist(root: str | Path | None, split: str, download: bool) -> tuple[torch.Tensor, list[int]]:
    """(N, 1, 28, 28) uint8 images and labels. A given root is the only place looked in (it and
    `root/FashionMNIST/raw`) and the only download target: it must be an existing folder, and no other
    copy stands in for it. Without a root: Debian's copy, else one downloaded into `DEFAULT_ROOT`
    before, else a download there.

    Raises:
        FileNotFoundError: a root that does not exist or is not a folder; the files not found and no
            download (not allowed, or failed). The message names the root, the files and how to get them.
        ValueError: a file that is not an IDX file of the expected shape (names it).
    """
    prefix = _FASHION_MNIST_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    wanted = " and ".join(f"{stem}[.gz]" for stem in stems)
    how = (
        f"Install Debian's package (sudo apt-get install dataset-fashion-mnist, files in "
        f"{FASHION_MNIST_DEBIAN_DIR}) and pass no root, or let torchvision download it: get_dataset("
        f"'fashion-mnist', root=<an existing folder>, download=True) on a machine with a network"
    )
    if root is None:  # Debian's copy, or one downloaded here before (found offline too)
        places, target = [FASHION_MNIST_DEBIAN_DIR, DEFAULT_ROOT / "FashionMNIST" / "raw"], DEFAULT_ROOT
    else:
        target = Path(root)
        places = [target, target / "FashionMNIST" / "raw"]
        if not target.is_dir():
            state = "is not a folder" if target.exists() else "does not exist"
            raise FileNotFoundError(f"Fashion-MNIST root={str(target)!r} {state}; it should hold {wanted}. {how}.")
    found = _find_fashion_mnist(places, stems)
    if found:
        return _read_fashion_mnist(*found)
    missing = f"Fashion-MNIST {split} files {wanted} not found in {[str(p) for p in places]}"
    if root is not None and (target / "train").is_dir() and any(p.is_dir() for p in (target / "train").iterdir()):
        raise FileNotFoundError(
            f"{missing}: {target} holds an image folder (train/<class>/...); read it with dataset 'imagenet' "
            "(--dataset imagenet), which takes any folder in that layout"
        )
    if not download:
        raise FileNotFoundError(f"{missing}. {how}.")
    debris = target / "FashionMNIST"
    fresh = not debris.exists()
    try:
        tv_datasets.FashionMNIST(str(target), train=split == "train", download=True)
    except (RuntimeError, OSError) as error:
        if fresh and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # leave the root as it was (no sibling rank)
            shutil.rmtree(debris, ignore_errors=True)
        raise FileNotFoundError(f"{missing}, and the download into {target} failed ({error}). {how}.") from error
    return _read_fashion_mnist(*_find_fashion_mnist([target / "FashionMNIST" / "raw"], stems))


def _find_fashion_mnist(places: list[Path], stems: tuple[str, str]) -> tuple[Path, Path] | None:
    """(images file, labels file) from the first place that holds both, gzip-compressed or not."""
    for place in places:
        images_file, labels_file = (_find_idx(place, stem) for stem in stems)
        if images_file and labels_file:
            return images_file, labels_file
    return None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _read_fashion_mnist(images_file: Path, labels_file: Path) -> tuple[torch.Tensor, list[int]]:
    """Raises ValueError: files that are not Fashion-MNIST's: other than 28x28 images, labels outside
    0..9, or as many images as labels (each names the file and the value)."""
    images = _read_idx(images_file, ndim=3)  # (N, 28, 28)
    labels = _read_idx(labels_file, ndim=1)  # (N,)
    if images.shape[1:] != (28, 28):
        size = "x".join(str(n) for n in images.shape[1:])
        raise ValueError(f"{images_file} holds images of {size}, Fashion-MNIST's are 28x28")
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{labels_file} holds a label {int(labels.max())}: Fashion-MNIST's are 0..9")
    if len(images) != len(labels):
        raise ValueError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(int).tolist()  # (N, 1, 28, 28)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not): magic 0x0000 08 <ndim>, then ndim
    big-endian int32 sizes, then the data.

    Raises:
        ValueError: not an unsigned-byte IDX file with `ndim` dimensions, or truncated; names the file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} bytes of data, its header says {shape}")
    return body.reshape(shape)


# ----------------------------------------------------------------------------- CIFAR-100


class _UncheckedCIFAR100(tv_datasets.CIFAR100):
    """torchvision's CIFAR-100 reader without its md5 checks: `_load_cifar100` runs them itself
    (unless verify=False) so that a differing copy gets a clear error instead of a re-download."""

    train_list = [[filename, None] for filename, _ in tv_datasets.CIFAR100.train_list]
    test_list = [[filename, None] for filename, _ in tv_datasets.CIFAR100.test_list]
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


def _load_cifar100(root: str | Path | None, split: str, download: bool, verify: bool) -> tv_datasets.CIFAR100:
    """torchvision's CIFAR-100 `split` from `root/cifar-100-python`, downloaded there if allowed and missing.

    Raises:
        ValueError: files whose md5 differs from the official release (unless `verify` is False), or
            files that cannot be read.
        FileNotFoundError: no files and no download (not allowed, or failed).
    """
    root = DEFAULT_ROOT if root is None else Path(root)
    reference = tv_datasets.CIFAR100
    folder = root / reference.base_folder
    meta = [[reference.meta["filename"], reference.meta["md5"]]]
    if all((folder / filename).is_file() for filename, _ in reference.train_list + reference.test_list + meta):
        used = (reference.train_list if split == "train" else reference.test_list) + meta
        differ = [filename for filename, md5 in used if verify and not check_integrity(str(folder / filename), md5)]
        if differ:
            raise ValueError(
                f"CIFAR-100 files {differ} in {folder} differ from the official release (md5); "
                "re-download them, or use this copy anyway: verify=False in Python, "
                "--no-verify-files on the command line"
            )
        try:
            return _UncheckedCIFAR100(str(root), train=split == "train")
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError) as error:
            raise ValueError(f"CIFAR-100 files in {folder} cannot be read: {error!r}") from error
    if not download:
        raise FileNotFoundError(
            f"CIFAR-100 not found in {folder} (root={str(root)!r}); pass download=True on a machine with a network"
        )
    try:
        return reference(str(root), train=split == "train", download=True)
    except (RuntimeError, OSError) as error:
        raise FileNotFoundError(f"CIFAR-100 not found in {folder} and the download failed ({error})") from error


# ----------------------------------------------------------------------------- image folders

SPLIT_FOLDERS = ("train", "val", "test")  # the split folders an image folder may hold


def _find_folder_samples(
    name: str,
    root: str | Path | None,
    split: str,
    *,
    num_classes: int | None,
    files_per_class: int | None,
    check_images: str,
) -> tuple[list[str], list[int], list[str], Path]:
    """IDs, labels, class names and root of an image-folder split, with the checks of `get_dataset`
    done: the held-out split's class folders equal train's, no image reached twice, files checked."""
    if root is None:
        raise ValueError(f"{name} needs root, the folder holding train/ and val/")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root={str(root)!r} is not a folder")
    if split != "train" and (root / "train").is_dir():
        _check_same_classes(root / "train", root / split)
    ids, targets, classes = _scan_folder(root, split, num_classes, files_per_class)
    _check_image_files(root, ids, check_images)
    return ids, targets, classes, root


def _class_folders(split_dir: Path) -> list[str]:
    """The names of the class folders (or links to folders) in `split_dir`, sorted; hidden ones (".name",
    such as JupyterLab's .ipynb_checkpoints) are skipped, with a warning that counts them.

    Raises:
        FileNotFoundError: `split_dir` is not a folder, or holds no folders.
        ValueError: `split_dir` cannot be listed (the OS's reason is named).
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no {split_dir.name} folder {split_dir}")
    try:
        folders = [entry.name for entry in os.scandir(split_dir) if entry.is_dir()]
    except OSError as error:
        raise ValueError(f"cannot list {split_dir}: {error.strerror or error}") from error
    classes = sorted(name for name in folders if not _hidden(name))
    _warn_hidden(split_dir, len(folders) - len(classes), "folder(s)")
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class folders")
    return classes


def _check_same_classes(train_dir: Path, held_out_dir: Path) -> None:
    """Raises ValueError (naming the missing and extra classes) where the two folders hold different
    class folders: labels are positions in the sorted class list, so they would not match."""
    train, held_out = _class_folders(train_dir), _class_folders(held_out_dir)
    if train != held_out:
        missing = sorted(set(train) - set(held_out))
        extra = sorted(set(held_out) - set(train))
        raise ValueError(
            f"{held_out_dir} and {train_dir} hold different class folders, so their labels would not match: "
            f"missing from {held_out_dir.name}: {_named(missing)}; extra in {held_out_dir.name}: {_named(extra)}. "
            "Give both splits the same class folders"
        )


def _scan_folder(
    root: Path, split: str, max_classes: int | None, files_per_class: int | None
) -> tuple[list[str], list[int], list[str]]:
    """IDs "{split}/{class}/{file}", labels and class names: class folders sorted, files sorted
    within each class (walking subfolders), first `max_classes` classes, first `files_per_class` files.

    Links: a class folder may be a link, and links inside a class folder, to files or folders, are
    followed, except a link to a folder that contains it or a folder on the way to it (a loop such
    as `ln -s . loop`), which is skipped. No image is counted twice: a folder holding images or an
    image file that two paths reach (a link to another class's folder or to one of its images, two
    class folders linking to one place) is refused, naming both paths, and so is a link into another
    split folder (train/, val/, test/): a leak between the splits. Hard links are separate files.
    Hidden entries (".name") are skipped, with a warning that counts them.

    Raises:
        FileNotFoundError: no split folder, no class folders, or a class folder without images.
        ValueError: max_classes above the number of class folders, an image reached by two paths or
            from two splits, a folder that cannot be listed, or a name that is not UTF-8 text.
    """
    split_dir = root / split
    classes = _class_folders(split_dir)
    if max_classes is not None:
        if max_classes > len(classes):
            raise ValueError(f"num_classes={max_classes} but {split_dir} has only {len(classes)} class folders")
        classes = classes[:max_classes]
    walk = _ImageWalk(split_dir)
    ids, targets = [], []
    for label, class_name in enumerate(classes):
        files = walk.class_images(class_name)
        if not files:
            raise FileNotFoundError(
                f"class folder {split_dir / class_name} holds no images ({', '.join(IMG_EXTENSIONS)})"
            )
        files = files[:files_per_class]
        for file in [class_name, *files]:  # an ID is text: a name that is not UTF-8 could not be hashed
            if file != file.encode("utf-8", "replace").decode("utf-8"):  # undecodable bytes (surrogate escapes)
                raise ValueError(
                    f"{split_dir / os.fsencode(file).decode('utf-8', 'replace')}: a file name "
                    f"that is not UTF-8 text ({os.fsencode(file)!r}): rename it"
                )
        ids += [f"{split}/{file}" for file in files]
        targets += [label] * len(files)
    walk.check_linked_files()
    walk.check_no_other_split(root, split)
    _warn_hidden(split_dir, walk.hidden, "file(s) or folder(s) inside the class folders")
    return ids, targets, classes


class _ImageWalk:
    """The image files under the class folders of one split folder, following links as `_scan_folder`
    says. Paths are relative to the split folder ("{class}/{file}"); real paths have no links."""

    def __init__(self, split_dir: Path) -> None:
        self.split_dir = split_dir
        self.real_split_dir = os.path.realpath(split_dir)
        self.folders: dict[str, tuple[str, int]] = {}  # real path -> (first path to it, images in and below it)
        self.linked_files: list[tuple[str, str]] = []  # (path, real path) of each image file that is a link
        self.found: list[str] = []  # every image file's path, in walk order
        self.hidden = 0  # hidden entries (".name") skipped inside the class folders

    def class_images(self, class_name: str) -> list[str]:
        """The sorted paths of the images of one class folder.

        Raises:
            ValueError: a folder holding images reached again, or a folder that cannot be listed.
        """
        start = len(self.found)
        self._enter(class_name, os.path.realpath(self.split_dir / class_name), (self.real_split_dir,))
        return sorted(self.found[start:])

    def check_linked_files(self) -> None:
        """Raises ValueError where an image file that is a link leads to an image already counted."""
        if not self.linked_files:
            return
        counted = set(self.found)
        first_path: dict[str, str] = {}
        for path, real in self.linked_files:
            folder, name = os.path.split(real)
            plain = f"{self.folders[folder][0]}/{name}" if folder in self.folders else None
            first = first_path.get(real, plain if plain in counted and plain != path else None)  # not a link loop
            if first is not None:
                raise ValueError(
                    f"{self.split_dir / path} is a link to {real}, also counted as {self.split_dir / first}: "
                    "one image would be counted twice. Remove the link"
                )
            first_path[real] = path

    def check_no_other_split(self, root: Path, split: str) -> None:
        """Raises ValueError where a link of this split leads into another split folder of `root`
        (train/, val/, test/): an image reached from both splits would leak between them."""
        reached = [(path, real) for path, real in self.linked_files]
        reached += [(first, real) for real, (first, _) in self.folders.items()]
        for other in SPLIT_FOLDERS:
            other_dir = root / other
            if other == split or not other_dir.is_dir():
                continue
            other_real = os.path.realpath(other_dir)
            for path, real in reached:
                if _contains(other_real, real):
                    raise ValueError(
                        f"{self.split_dir / path} leads to {real}, inside {other_dir}: an image reached from both "
                        f"{split}/ and {other}/ would leak between the splits. Copy the file instead of linking it"
                    )

    def _enter(self, path: str, real: str, above: tuple[str, ...]) -> int:
        """Walk folder `path` unless another path walked it; the number of images in and below it."""
        if real in self.folders:
            first, count = self.folders[real]
            if count:
                raise ValueError(
                    f"{self.split_dir / path} and {self.split_dir / first} are one folder ({real}) holding {count} "
                    "images: they would be counted twice. Remove the link that leads there twice"
                )
            return 0
        self.folders[real] = (path, 0)
        count = self._walk(path, real, (*above, real))
        self.folders[real] = (path, count)
        return count

    def _walk(self, path: str, real: str, above: tuple[str, ...]) -> int:
        try:
            entries = sorted(os.scandir(self.split_dir / path), key=lambda entry: entry.name)
        except OSError as error:
            raise ValueError(f"cannot list folder {self.split_dir / path}: {error}") from error
        count = 0
        hidden = [entry for entry in entries if _hidden(entry.name)]
        self.hidden += len(hidden)
        for entry in entries:
            if _hidden(entry.name):
                continue
            entry_path = f"{path}/{entry.name}"
            if _is_folder(entry):
                target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if not any(_contains(target, folder) for folder in above):  # else a loop: skipped
                    count += self._enter(entry_path, target, above)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                self.found.append(entry_path)
                if entry.is_symlink():
                    self.linked_files.append((entry_path, os.path.realpath(entry.path)))
                count += 1
        return count


def _hidden(name: str) -> bool:
    """Whether a folder entry is hidden (".name": .ipynb_checkpoints, .DS_Store, ...): never a class or an image."""
    return name.startswith(".")


def _warn_hidden(folder: Path, count: int, what: str) -> None:
    """Say how many hidden entries of `folder` were skipped (none: nothing)."""
    if count:
        warnings.warn(f"{folder}: skipped {count} hidden {what} (names starting with '.')", stacklevel=3)


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether `entry` is a folder or a link to one; a link that leads nowhere (ELOOP) is not (as in os.walk)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _contains(folder: str, path: str) -> bool:
    """Whether real path `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_image_files(root: Path, ids: list[str], mode: str) -> None:
    """Check the files `root/{id}` as `mode` ("header", "decode" or "off") says; see `get_dataset`.

    Raises:
        ValueError: names every file that fails.
    """
    if mode == "off":
        return
    problem_of, folder = (_header_problem if mode == "header" else _decode_problem), str(root)
    bad = [f"{sample_id} ({problem})" for sample_id in ids if (problem := problem_of(f"{folder}/{sample_id}"))]
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(ids)} image files under {root} are not readable images "
            f"(check_images={mode!r}): {', '.join(bad)}. Remove or replace them, or skip this check "
            "(check_images='off' in Python, --check-images off on the command line)"
        )


def _header_problem(path: str) -> str | None:
    """What is wrong with the file at `path` judged by its first 16 bytes, or None: see `_IMAGE_MAGIC`."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            header = os.read(descriptor, 16)
        finally:
            os.close(descriptor)
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if not header:
        return "empty file"
    is_webp = header.startswith(b"RIFF") and header[8:12] == b"WEBP"
    if not is_webp and not header.startswith(_IMAGE_PREFIXES):
        return f"not a {', '.join(_IMAGE_MAGIC)} or WebP file: starts with {header[:8]!r}"
    return None


def _decode_problem(path: str) -> str | None:
    """Why the file at `path` cannot be decoded as training decodes it, or None."""
    try:
        _read_rgb(Path(path))
    except (FileNotFoundError, ValueError) as error:
        return str(error.__cause__ or error)
    return None


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow's modes of more than 8 bits a channel


def _read_rgb(path: Path) -> np.ndarray:
    """The image file's pixels as uint8 RGB (H, W, 3), decoded by Pillow as torchvision's ImageFolder does
    (EXIF orientation is not applied, and transparent pixels keep their colour channels).

    Raises:
        FileNotFoundError: the file is gone.
        ValueError: the file cannot be decoded, or holds 16-bit or floating-point pixels (Pillow would
            clip them to 0..255, not scale them); the message names it.
    """
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_MODES:
                raise ValueError(f"{image.mode!r} pixels (16-bit or float) would be clipped to 8 bits: save as 8-bit")
            return np.asarray(image.convert("RGB"))  # (H, W, 3)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise ValueError(
            f"cannot decode image file {path}: {error} (check_images='decode', --check-images decode, finds every such "
            "file before a run starts)"
        ) from error


def _named(names: list[str]) -> str:
    """`names` joined with commas, the first `_MAX_NAMED` of them and then how many more; "none" if empty."""
    if not names:
        return "none"
    shown = ", ".join(names[:_MAX_NAMED])
    return shown if len(names) <= _MAX_NAMED else f"{shown} and {len(names) - _MAX_NAMED} more"


# ----------------------------------------------------------------------------- synthetic


def _make_synthetic(split: str, num_samples: int, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """(N, 3, 32, 32) uint8 images, labels 0, 1, ..., K-1, 0, 1, ...: one fixed 4x4 colour layout per
    class (8x8-pixel cells), plus a per-image brightness shift and per-pixel noise. Integer
    arithmetic on torch's Mersenne Twister, so the bytes are the same on every machine."""
    prototypes = torch.randint(0, 256, (num_classes, 3, 4, 4), generator=torch.Generator().manual_seed(_SYNTHETIC_SEED))
    prototypes = prototypes.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (K, 3, 32, 32)
    generator = torch.Generator().manual_seed(derive_seed("synthetic", _SYNTHETIC_SEED, split))
    targets = torch.arange(num_samples) % num_classes
    shift = torch.randint(-32, 33, (num_samples, 1, 1, 1), generator=generator)
    noise = torch.randint(-48, 49, (num_samples, 3, 32, 32), generator=generator)
    images = (prototypes[targets] + shift + noise).clamp(0, 255).to(torch.uint8)  # (N, 3, 32, 32)
    return images, targets.tolist()


# ----------------------------------------------------------------------------- loaders


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order that depends only on the dataset's `data_seed` and current epoch, so the
    batches of an epoch (and with them the Mixup pairs) are the same in every run and on resume.

    Under data parallelism every rank draws the same permutation, cuts it to a multiple of
    `world_size` and takes every `world_size`-th index from `rank` (disjoint, equal shares).
    `skip(n)` drops this rank's first n indices of the next pass only: resuming mid-epoch.

    Raises:
        ValueError: rank outside [0, world_size).
    """

    def __init__(self, dataset: DatasetWithIDs, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self._skip = 0

    def __len__(self) -> int:
        return len(self.dataset) // self.world_size

    def skip(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        seed = derive_seed("order", self.dataset.data_seed, self.dataset.epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))
        mine = order[: len(self) * self.world_size][self.rank :: self.world_size]
        start, self._skip = self._skip, 0
        return iter(mine[start:].tolist())


def make_loaders(
    train: DatasetWithIDs, held_out: DatasetWithIDs, *, batch_size: int, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """A training loader (seeded per-epoch shuffle, full batches only, so Mixup pairs are complete)
    and an evaluation loader (file order). Call `train.set_epoch(e)` before each epoch.

    Raises:
        ValueError: batch_size < 1 or num_workers < 0.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(train),
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    eval_loader = DataLoader(held_out, batch_size=batch_size, num_workers=num_workers)
    return train_loader, eval_loader
