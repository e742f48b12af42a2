"""Seeded, replayable training transforms, and paired Mixup/CutMix.

Fast pretraining distillation stores the teacher's logits for one augmented view of each image
and epoch; the student must later see exactly that view. So every random choice made for one
sample in one epoch comes from one integer seed:

    seed = sample_seed(data_seed, epoch, sample_id)        # sample_id: the permanent string ID

and `TrainTransform(image, seed)` returns the same tensor bit for bit for the same image and seed,
in any process, worker, shuffle or run (on the same torch build and CPU kind). It runs
torchvision's v2 transforms with the process-wide CPU generator reseeded to `seed` and restored
afterwards (`seeded_rng`): the v2 transforms used here draw only from that generator, never from
Python's `random` or NumPy.

Mixup/CutMix pair samples across the whole dataset, not within a batch: in each epoch every sample
has a partner (`mix_partners`, a random pairing drawn from the data seed and the epoch), and
`PairMix` mixes the two views (as its `MixConfig` says) with one draw seeded from the two samples'
seeds. A mixed view therefore depends only on the two images and their two seeds, and is rebuilt
exactly whatever the batch size, process count or data order (the official code pairs sample i
with sample B-1-i of its batch, which ties a store to the batch layout of its precompute).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "AugmentConfig",
    "AUGMENT_PRESETS",
    "MixConfig",
    "TrainTransform",
    "EvalTransform",
    "MIX_PRESETS",
    "PairMix",
    "mix_partners",
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


def sample_seed(data_seed: int, epoch: int, sample_id: str) -> int:
    """The seed of every random choice made for one sample in one epoch.

    `sample_id` is the sample's permanent string ID (`DatasetWithIDs.ids[i]`), so the seed does
    not depend on shuffling, worker count, rank or which subset the sample is part of.
    """
    return derive_seed("sample", data_seed, epoch, sample_id)


@contextmanager
def seeded_rng(seed: int) -> Iterator[Callable[[int], None]]:
    """Run the body with torch's CPU generator seeded to `seed`, then restore its previous state.

    `torch.random.fork_rng` does the same but also reseeds every accelerator backend, which costs
    far more per call; torchvision's transforms only draw from the CPU generator. The body gets
    `reseed(seed)`, which seeds the generator again (for many samples under one save and restore).

    Raises:
        ValueError: `seed` (or a seed given to `reseed`) is not in [0, 2**64).
    """
    generator = torch.default_generator

    def reseed(seed: int) -> None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed} must be in [0, 2**64)")
        generator.manual_seed(seed)

    saved = generator.get_state()
    try:
        reseed(seed)
        yield reseed
    finally:
        generator.set_state(saved)


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation of one image's view (`TrainTransform`); mixing two views is
    `MixConfig`'s. Defaults follow TinyViT's ImageNet recipe (Swin/DeiT style).

    Differences from the official (timm) pipeline: torchvision's RandAugment uses a fixed
    magnitude (timm's "rand-m9-mstd0.5-inc1" adds magnitude noise).

    Raises:
        ValueError: a probability outside [0, 1], a negative count, a RandAugment magnitude above 30
            (its 31 bins), or a bad range.
    """

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    hflip: float = 0.5  # probability; datasets where a mirror image changes the class force 0
    randaugment_ops: int = 2  # 0 turns RandAugment off
    randaugment_magnitude: int = 9
    erase_prob: float = 0.25  # RandomErasing with per-pixel normal noise (timm's "pixel" mode)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))  # lists from JSON
        object.__setattr__(self, "ratio", tuple(self.ratio))
        _check_probabilities(self, ("hflip", "erase_prob"))
        _check_non_negative(self, ("randaugment_ops", "randaugment_magnitude"))
        if self.randaugment_magnitude > 30:
            magnitude = self.randaugment_magnitude
            raise ValueError(f"randaugment_magnitude={magnitude} must be in [0, 30] (RandAugment's 31 bins)")
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name}={getattr(self, name)} must be (low, high) with 0 < low <= high")

    def to_dict(self) -> dict:
        """Plain values, for a logit store's manifest or a checkpoint."""
        return asdict(self)


@dataclass(frozen=True)
class MixConfig:
    """How `PairMix` mixes a view with its partner's: Mixup, CutMix, or one of the two per pair.
    Defaults follow TinyViT's ImageNet recipe (DeiT's). Label smoothing belongs to the loss, not to
    the mixed targets.

    Raises:
        ValueError: a probability outside [0, 1] or a negative alpha.
    """

    mixup_alpha: float = 0.8  # 0 turns Mixup off
    cutmix_alpha: float = 1.0  # 0 turns CutMix off
    mix_prob: float = 1.0  # probability that a pair is mixed at all
    mix_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on

    def __post_init__(self) -> None:
        _check_probabilities(self, ("mix_prob", "mix_switch_prob"))
        _check_non_negative(self, ("mixup_alpha", "cutmix_alpha"))

    @property
    def mixing(self) -> bool:
        """Whether `PairMix` changes anything under this config."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict[str, float]:
        """The settings that decide a mixed view, by field name: what a mixed store records and compares."""
        return asdict(self)


def _check_probabilities(config: AugmentConfig | MixConfig, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of `names` whose value is outside [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name}={getattr(config, name)} must be a probability in [0, 1]")


def _check_non_negative(config: AugmentConfig | MixConfig, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of `names` whose value is negative."""
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 0")


# Named recipes for the CLI and the profiles. "full" is TinyViT's ImageNet recipe; "light" suits
# the course's short runs on small images, where heavy augmentation costs more than it gives.
AUGMENT_PRESETS: dict[str, AugmentConfig | None] = {
    "none": None,  # the deterministic evaluation transform
    "light": AugmentConfig(scale=(0.35, 1.0), randaugment_ops=0, erase_prob=0.0),
    "full": AugmentConfig(),
}

# Named mixing recipes for `--mix PRESET` and `DataSpec.mix`.
MIX_PRESETS: dict[str, MixConfig] = {
    # TinyViT's ImageNet recipe (DeiT's): Mixup 0.8 or CutMix 1.0, one of the two per pair.
    "full": MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=0.5),
    # Beyer et al. (CVPR 2022), "function matching": Mixup with its coefficient uniform in [0, 1]
    # (Beta(1, 1)), on every image, no CutMix.
    "function-matching": MixConfig(mixup_alpha=1.0, cutmix_alpha=0.0, mix_prob=1.0, mix_switch_prob=0.0),
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
        self._log_ratio = tuple(torch.log(torch.tensor(config.ratio)).tolist())  # as v2 computes it, float32
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
        `batch` equal bit for bit, at a few times their cost. For tests and `make bench`."""
        with seeded_rng(seed):
            return self.pipeline(image)

    def batch(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        """The views of several images at once, (B, C, img_size, img_size) float32: view i equals
        `self.pipeline(images[i])` under `seeded_rng(seeds[i])` bit for bit (the tests check it).

        Each image's random draws and geometric steps run alone, in the pipeline's order: the crop box
        drawn as v2 draws it (`_crop_box`), v2's kernels and its other transforms' parameter draws
        called without their per-call dispatch (which outweighs the kernels' work on small images);
        scaling and normalising then run once on the batch; the erasing boxes (drawn with the rest,
        they depend only on the image shape) go in last. The global generator is saved and restored
        once per batch.

        Raises:
            ValueError: a seed not in [0, 2**64), or `images` and `seeds` of different lengths.
        """
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        views, erasures = [], []
        draws = torch.empty(1), torch.empty(1, dtype=torch.int64)  # this call's own: workers may share the transform
        with seeded_rng(0) as reseed:
            for image, seed in zip(images, seeds):
                reseed(int(seed))
                views.append(self._geometric(image, draws))
                erasures.append(self._erase_box(views[-1]))
        batch = TF.normalize_image(
            TF.to_dtype_image(torch.stack(views), torch.float32, scale=True), self.mean, self.std
        )
        for view, box in zip(batch, erasures):
            if box is not None:
                TF.erase_image(view, **box, inplace=True)
        return batch

    def _geometric(self, image: torch.Tensor, draws: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """uint8 (C, H, W) -> uint8 (C, img_size, img_size): crop, flip, RandAugment, drawing as v2 does
        (`draws`: a float32 and an int64 one-element tensor to draw into)."""
        top, left, height, width = self._crop_box(*image.shape[-2:], draws)
        image = image[..., top : top + height, left : left + width]  # v2's crop: the box is inside the image
        if (height, width) != (self.img_size, self.img_size):  # v2's resize returns an image of that size as it is
            image = _resize_bicubic(image, self.img_size)
        if self.config.hflip > 0 and draws[0].uniform_().item() < self.config.hflip:  # v2 flips when rand < p
            image = image.flip(-1)
        return self.randaugment(image) if self.randaugment is not None else image

    def _crop_box(self, height: int, width: int, draws: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int, int, int]:
        """(top, left, height, width): `v2.RandomResizedCrop.make_params`'s draws and arithmetic, in its
        order and from the same generator (so the same box), without its per-call overhead: `draws`
        are reused one-element tensors, one per kind of draw (`empty(1).uniform_` and `randint` on a
        fresh tensor draw the same numbers)."""
        area, (draw, index) = height * width, draws
        scale, log_ratio = self.config.scale, self._log_ratio
        for _ in range(10):
            target_area = area * draw.uniform_(scale[0], scale[1]).item()
            aspect_ratio = draw.uniform_(log_ratio[0], log_ratio[1]).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return index.random_(0, height - h + 1).item(), index.random_(0, width - w + 1).item(), h, w
        in_ratio, ratio = width / height, self.config.ratio  # ten misses: the central crop, as v2 falls back
        if in_ratio < min(ratio):
            h, w = int(round(width / min(ratio))), width
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

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


_NATIVE_RESIZE_DTYPES = (torch.uint8, torch.float32, torch.float64)  # what v2 resizes without a cast


def _resize_bicubic(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size): v2's `resize_image` (bicubic, antialiased) without its per-call
    checks, the same `interpolate` call on the same strides (uint8 stays uint8: v2 uses torch's
    native uint8 kernel for bicubic on a CPU). Other inputs (a GPU, float16) go through v2 itself."""
    if image.dim() != 3 or image.device.type != "cpu" or image.dtype not in _NATIVE_RESIZE_DTYPES:
        return TF.resize_image(image, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    channels, height, width = image.shape
    image = image.reshape(1, channels, height, width)
    if image.is_contiguous(memory_format=torch.channels_last) and image.numel() != image.stride(0):
        image = image.as_strided(image.shape, (image.numel(), *image.stride()[1:]))  # as v2 does: output channels-last
    out = F.interpolate(image, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(channels, size, size)


@functools.lru_cache(maxsize=4)  # asked once per batch: a randperm of 1.28M for ImageNet is not free
def mix_partners(size: int, data_seed: int, epoch: int) -> torch.Tensor:
    """(size,) int64: the partner of each position in `epoch`, a random pairing of the positions
    [0, size) drawn from (data_seed, epoch) alone: partner[partner[i]] == i. With an odd size one
    position is its own partner (its view stays unmixed). Cached: index it, never write to it."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed("partners", data_seed, epoch)))
    partner = torch.arange(size)
    pairs = order[: size - size % 2].view(-1, 2)  # (size // 2, 2)
    partner[pairs[:, 0]], partner[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    return partner


class PairMix:
    """Mixup/CutMix of a view with its partner's, replayable from the two views' seeds alone.

    The pair is ordered by seed (the smaller first), and one draw from `derive_seed("pair", ...)`
    of the two seeds decides whether it mixes (`mix_prob`), Mixup or CutMix (`mix_switch_prob`),
    and the coefficient (and box), through torchvision's `v2.MixUp` / `v2.CutMix` on the two-image
    batch: the first becomes lam*first + (1-lam)*second (or first with second's box), the second
    the same with the roles swapped. Both members of a pair therefore draw once and agree, whatever
    batch, process or order they are computed in. A view paired with itself stays as it is.

    Raises:
        ValueError: `num_classes` < 1.
    """

    def __init__(self, num_classes: int, config: MixConfig) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.num_classes, self.config = num_classes, config
        self.mixup = v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes) if config.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes) if config.cutmix_alpha > 0 else None

    def __call__(
        self, view: torch.Tensor, partner: torch.Tensor, label: int, partner_label: int, seed: int, partner_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """view, partner (C, H, W) float -> the mixed view (C, H, W) and its soft target (num_classes,).

        Equal bit for bit to `reference` (v2's transform on the ordered two-image batch), computing
        only this view's row: v2 mixes each image of the batch with its roll, i.e. with the other one.

        Raises:
            ValueError: views of different shapes, or a label outside [0, num_classes).
        """
        if view.shape != partner.shape:
            raise ValueError(f"a view of shape {tuple(view.shape)} cannot mix with one of {tuple(partner.shape)}")
        own, other = self._one_hot(label, view.dtype), self._one_hot(partner_label, view.dtype)  # (K,)
        if seed == partner_seed or not self.config.mixing:
            return view, own
        with seeded_rng(derive_seed("pair", min(seed, partner_seed), max(seed, partner_seed))):
            draw_mix, draw_switch = torch.rand(2).tolist()
            if draw_mix >= self.config.mix_prob:
                return view, own
            use_cutmix = self.mixup is None or (self.cutmix is not None and draw_switch < self.config.mix_switch_prob)
            params = (self.cutmix if use_cutmix else self.mixup).make_params([view])  # v2's draws, in its order
        if use_cutmix:  # the partner's box pasted in; the target weighted by the area kept
            x1, y1, x2, y2 = params["box"]
            mixed, lam = view.clone(), params["lam_adjusted"]
            mixed[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        else:  # the same float operations, in the same order, as v2.MixUp's `roll(1, 0).mul_(1 - lam).add_(x.mul(lam))`
            lam = params["lam"]
            mixed = partner.mul(1.0 - lam).add_(view.mul(lam))
        return mixed, other.mul(1.0 - lam).add_(own.mul(lam))

    def _one_hot(self, label: int, dtype: torch.dtype) -> torch.Tensor:
        """`F.one_hot(label, num_classes)` as `dtype`, (K,), without its per-call checks but its refusal.

        Raises:
            ValueError: `label` outside [0, num_classes).
        """
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label={label} outside [0, {self.num_classes})")
        target = torch.zeros(self.num_classes, dtype=dtype)
        target[label] = 1
        return target

    def reference(
        self, view: torch.Tensor, partner: torch.Tensor, label: int, partner_label: int, seed: int, partner_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same through torchvision's `v2.MixUp` / `v2.CutMix` called on the two-image batch
        (what `__call__` equals bit for bit, at more than its cost). For tests."""
        target = F.one_hot(torch.tensor([label, partner_label]), self.num_classes).to(view.dtype)  # (2, K)
        if seed == partner_seed or not self.config.mixing:
            return view, target[0]
        first = 0 if seed < partner_seed else 1  # where this view sits in the ordered pair
        images = torch.stack([view, partner] if first == 0 else [partner, view])  # (2, C, H, W)
        targets = target if first == 0 else target.flip(0)
        with seeded_rng(derive_seed("pair", min(seed, partner_seed), max(seed, partner_seed))):
            draw_mix, draw_switch = torch.rand(2).tolist()
            if draw_mix >= self.config.mix_prob:
                return view, target[0]
            use_cutmix = self.mixup is None or (self.cutmix is not None and draw_switch < self.config.mix_switch_prob)
            images, targets = (self.cutmix if use_cutmix else self.mixup)(images, targets)
        return images[first], targets[first]
