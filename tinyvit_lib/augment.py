"""Seeded, replayable training transforms, and paired Mixup/CutMix.

Fast pretraining distillation stores the teacher's logits for one augmented view of each image
and epoch; the student must later see exactly that view. So every random choice made for one
sample in one epoch comes from one integer seed:

    seed = sample_seed(base_seed, epoch, sample_id)        # sample_id: the permanent string ID

and `TrainTransform(image, seed)` returns the same tensor bit for bit for the same image and seed,
in any process, worker, shuffle or run (on the same torch build and CPU kind). It runs
torchvision's v2 transforms with the process-wide CPU generator reseeded to `seed` and restored
afterwards (`seeded_rng`): the v2 transforms used here draw only from that generator, never from
Python's `random` or NumPy.

Mixup/CutMix work on batches. `PairedMix` uses the official implementation's paired mode: sample
i is mixed with sample B-1-i (the batch in flipped order), with one mixing draw per pair seeded
from the two samples' seeds. The draw is symmetric in the pair, so a mixed view depends only on
the two images and their two seeds and can be replayed from that pair alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "AugmentConfig",
    "AUGMENT_PRESETS",
    "TrainTransform",
    "EvalTransform",
    "PairedMix",
    "derive_seed",
    "sample_seed",
    "seeded_rng",
]

_SEED_BITS = 63  # seeds fit an int64 (the logit store's seed field) and torch.manual_seed


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from integers and strings (BLAKE2b, not Python's salted `hash`).

    The parts are joined with "/" after `str()`, so `derive_seed(1, "a")` is the same everywhere.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def sample_seed(base_seed: int, epoch: int, sample_id: str) -> int:
    """The seed of every random choice made for one sample in one epoch.

    `sample_id` is the sample's permanent string ID (`DatasetWithIDs.ids[i]`), so the seed does
    not depend on shuffling, worker count, rank or which subset the sample is part of.
    """
    return derive_seed("sample", base_seed, epoch, sample_id)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded to `seed`, then restore its previous state.

    `torch.random.fork_rng` does the same but also reseeds every accelerator backend, which is
    ~100x slower per call; torchvision's transforms only draw from the CPU generator.

    Raises:
        ValueError: `seed` is not in [0, 2**64).
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed} must be in [0, 2**64)")
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation. Defaults follow TinyViT's ImageNet recipe (Swin/DeiT style).

    Differences from the official (timm) pipeline: torchvision's RandAugment uses a fixed
    magnitude (timm's "rand-m9-mstd0.5-inc1" adds magnitude noise), and label smoothing belongs
    to the loss, not to the mixed targets.

    Raises:
        ValueError: a probability outside [0, 1], a negative alpha or count, or a bad range.
    """

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    hflip: float = 0.5  # probability; datasets where a mirror image changes the class force 0
    randaugment_ops: int = 2  # 0 turns RandAugment off
    randaugment_magnitude: int = 9
    erase_prob: float = 0.25  # RandomErasing with per-pixel normal noise (timm's "pixel" mode)
    mixup_alpha: float = 0.8  # 0 turns Mixup off
    cutmix_alpha: float = 1.0  # 0 turns CutMix off
    mix_prob: float = 1.0  # probability that a pair is mixed at all
    mix_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))  # lists from JSON
        object.__setattr__(self, "ratio", tuple(self.ratio))
        for name in ("hflip", "erase_prob", "mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        for name in ("mixup_alpha", "cutmix_alpha", "randaugment_ops", "randaugment_magnitude"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name}={getattr(self, name)} must be (low, high) with 0 < low <= high")

    @property
    def mixing(self) -> bool:
        """Whether `PairedMix` changes anything under this config."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        """Plain values, for a logit store's manifest or a checkpoint."""
        return asdict(self)


# Named recipes for the CLI and the profiles. "full" is TinyViT's ImageNet recipe; "light" suits
# the course's short runs on small images, where heavy augmentation costs more than it gives.
AUGMENT_PRESETS: dict[str, AugmentConfig | None] = {
    "none": None,  # the deterministic evaluation transform
    "light": AugmentConfig(scale=(0.35, 1.0), randaugment_ops=0, erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
    "full": AugmentConfig(),
}


class TrainTransform:
    """Per-sample training augmentation at `img_size`, replayable from one integer seed.

    uint8 image (C, H, W) -> RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment
    -> float in [0, 1] -> normalise -> RandomErasing -> float (C, img_size, img_size).
    Works for C = 1 (grayscale) and C = 3.

    Raises:
        ValueError: `img_size` < 1, or `mean`/`std` of different lengths.
    """

    def __init__(
        self, img_size: int, mean: Sequence[float], std: Sequence[float], *, config: AugmentConfig = AugmentConfig()
    ) -> None:
        _check_norm(img_size, mean, std)
        self.img_size = img_size
        self.config = config
        self.mean, self.std = list(mean), list(std)
        self.crop = v2.RandomResizedCrop(
            img_size, scale=config.scale, ratio=config.ratio, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        self.randaugment = (
            v2.RandAugment(num_ops=config.randaugment_ops, magnitude=config.randaugment_magnitude)
            if config.randaugment_ops > 0
            else None
        )
        self.erase = v2.RandomErasing(p=config.erase_prob, value="random") if config.erase_prob > 0 else None
        # The same steps as one torchvision pipeline: the reference that `__call__` equals bit for bit.
        steps: list[v2.Transform] = [self.crop]
        if config.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(config.hflip))
        if self.randaugment is not None:
            steps.append(self.randaugment)
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if self.erase is not None:
            steps.append(self.erase)
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The augmented view of `image` (uint8, (C, H, W)) for `seed`; the same seed gives the same
        tensor bit for bit. The global RNG is left as it was.

        Raises:
            ValueError: `seed` is not in [0, 2**64).
        """
        return self.batch([image], [seed])[0]  # (C, img_size, img_size) float32

    def reference(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The view as the torchvision pipeline makes it, one v2 call per step: what `__call__` and
        `batch` equal bit for bit, at 1.7x (32x32) their cost. For tests and `make bench`."""
        with seeded_rng(seed):
            return self.pipeline(image)

    def batch(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        """The views of several images at once, (B, C, img_size, img_size) float32: view i equals
        `self.pipeline(images[i])` under `seeded_rng(seeds[i])` bit for bit (the tests check it).

        Each image's random draws and geometric steps run alone, in the pipeline's order, calling the
        v2 transforms' own parameter draws and kernels without their per-call dispatch (3-4x the
        work of the kernels on a 32x32 image); scaling and normalising then run once on the batch;
        the erasing boxes (drawn with the rest, they depend only on the image shape) go in last.

        Raises:
            ValueError: a seed not in [0, 2**64), or `images` and `seeds` of different lengths.
        """
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        views, erasures = [], []
        for image, seed in zip(images, seeds):
            with seeded_rng(int(seed)):
                views.append(self._geometric(image))
                erasures.append(self._erase_box(views[-1]))
        batch = TF.normalize_image(
            TF.to_dtype_image(torch.stack(views), torch.float32, scale=True), self.mean, self.std
        )
        for view, box in zip(batch, erasures):
            if box is not None:
                TF.erase_image(view, **box, inplace=True)
        return batch

    def _geometric(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) -> uint8 (C, img_size, img_size): crop, flip, RandAugment, drawing as v2 does."""
        box = self.crop.make_params([image])  # top, left, height, width
        image = TF.resized_crop_image(
            image, **box, size=self.crop.size, interpolation=self.crop.interpolation, antialias=self.crop.antialias
        )
        if self.config.hflip > 0 and torch.rand(1) < self.config.hflip:  # v2 skips the flip when rand >= p
            image = TF.horizontal_flip_image(image)
        return self.randaugment(image) if self.randaugment is not None else image

    def _erase_box(self, view: torch.Tensor) -> dict | None:
        """RandomErasing's draws for a view of this shape, in v2's order: None where it erases nothing."""
        if self.erase is None or torch.rand(1) >= self.erase.p:
            return None
        box = self.erase.make_params([view])  # i, j, h, w and the noise v (None: nothing to erase)
        return box if box["v"] is not None else None

    def __repr__(self) -> str:
        return f"TrainTransform(img_size={self.img_size}, config={self.config})"


class EvalTransform:
    """Deterministic evaluation transform: resize the short side to img_size / crop_pct
    (bicubic), center-crop img_size, scale to [0, 1] and normalise. The seed is ignored.

    Works on one image (C, H, W) or a batch (B, C, H, W) alike, with the same result per image. The
    steps are torchvision's (v2 Resize, CenterCrop, ToDtype, Normalize) called directly and skipped where they would not
    change the image, since their per-call overhead is larger than the work on a 32x32 image.

    Raises:
        ValueError: `img_size` < 1, `crop_pct` outside (0, 1], or `mean`/`std` of different lengths.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], *, crop_pct: float = 1.0) -> None:
        _check_norm(img_size, mean, std)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
        self.img_size, self.resize_to = img_size, round(img_size / crop_pct)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """uint8 (C, H, W) -> float32 (C, img_size, img_size); or the same with a leading batch dim.

        Raises:
            TypeError: the image is not uint8.
        """
        if image.dtype != torch.uint8:
            raise TypeError(f"EvalTransform takes uint8 images, got {image.dtype}")
        if min(image.shape[-2:]) != self.resize_to:
            image = TF.resize(image, [self.resize_to], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            image = TF.center_crop(image, [self.img_size])
        # v2.ToDtype(scale=True) then v2.Normalize, the same float32 operations in the same order
        return image.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def batch(self, images: torch.Tensor | Sequence[torch.Tensor], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W), or B images of any sizes -> float32 (B, C, img_size, img_size); seeds are ignored.

        Raises:
            TypeError: an image is not uint8.
        """
        if isinstance(images, torch.Tensor):
            return self(images)
        return torch.stack([self(image) for image in images])

    def __repr__(self) -> str:  # a static store's manifest keeps this: it must name every setting
        mean, std = (tuple(round(v, 4) for v in t.flatten().tolist()) for t in (self.mean, self.std))
        return f"EvalTransform(img_size={self.img_size}, resize_to={self.resize_to}, mean={mean}, std={std})"


def _check_norm(img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if img_size < 1:
        raise ValueError(f"img_size={img_size} must be >= 1")
    if len(mean) != len(std):
        raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have one entry per channel")


class PairedMix:
    """Mixup/CutMix on fixed pairs (TinyViT's paired mode), replayable from per-sample seeds.

    Sample i is paired with sample B-1-i. Each pair draws, from `derive_seed("pair", ...)` of its
    two sample seeds (order-independent), whether it is mixed (`mix_prob`), Mixup or CutMix
    (`mix_switch_prob`), and the mixing factor (and box) through torchvision's `v2.MixUp` /
    `v2.CutMix`, applied to the two-image batch [a, b]: a becomes lam*a + (1-lam)*b (or a with
    b's box), b likewise with the same lam. With an odd batch the middle sample pairs with itself
    and stays as it is.

    To replay the mixed view of the samples at positions i and j = B-1-i, call the object on just
    `images[[i, j]]`, `labels[[i, j]]`, `[seeds[i], seeds[j]]`: the result is bit-identical.

    Raises:
        ValueError: `num_classes` < 1.
    """

    def __init__(self, num_classes: int, config: AugmentConfig = AugmentConfig()) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes
        self.config = config
        self.mixup = v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes) if config.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes) if config.cutmix_alpha > 0 else None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: float images (B, C, H, W), int labels (B,), one seed per sample.

        Returns the mixed images (B, C, H, W) and soft targets (B, num_classes) that sum to 1.

        Raises:
            ValueError: the batch, labels and seeds differ in length, or a label is out of range.
        """
        seeds = [int(s) for s in seeds]
        batch = images.shape[0]
        if not labels.shape[0] == len(seeds) == batch:
            raise ValueError(
                f"images ({batch}), labels ({labels.shape[0]}) and seeds ({len(seeds)}) must have one entry per sample"
            )
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        targets = F.one_hot(labels.long(), self.num_classes).to(images.dtype)  # (B, K)
        if not self.config.mixing:
            return images, targets
        mixed_images, mixed_targets = images.clone(), targets.clone()
        for i in range(batch // 2):
            pair = [i, batch - 1 - i]
            pair_images, pair_targets = self._mix_pair(images[pair], targets[pair], seeds[i], seeds[batch - 1 - i])
            mixed_images[pair], mixed_targets[pair] = pair_images, pair_targets
        return mixed_images, mixed_targets

    def _mix_pair(
        self, images: torch.Tensor, targets: torch.Tensor, seed_a: int, seed_b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (2, C, H, W), targets (2, K) -> the same, mixed with each other."""
        config = self.config
        with seeded_rng(derive_seed("pair", min(seed_a, seed_b), max(seed_a, seed_b))):
            draw_mix, draw_switch = torch.rand(2).tolist()
            if draw_mix >= config.mix_prob:
                return images, targets
            use_cutmix = self.mixup is None or (self.cutmix is not None and draw_switch < config.mix_switch_prob)
            op = self.cutmix if use_cutmix else self.mixup
            return op(images, targets)
