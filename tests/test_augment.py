"""Replayable augmentation: seeds, per-sample transforms and paired Mixup/CutMix."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from tinyvit_lib.augment import (
    AUGMENT_PRESETS,
    AugmentConfig,
    EvalTransform,
    PairedMix,
    TrainTransform,
    derive_seed,
    sample_seed,
    seeded_rng,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
REPO = Path(__file__).resolve().parents[1]


def _images(channels: int = 3, count: int = 4, size: int = 28) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def test_seeds_are_pinned_and_separate():
    # The logit store records these values: they must never change between versions or machines.
    assert sample_seed(0, 0, "train/000000") == 5865768590785617992
    assert derive_seed("a", 1) == 6920629095001669593
    seeds = {sample_seed(b, e, i) for b in (0, 1) for e in (0, 1) for i in ("train/000000", "train/000001")}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_same_view_different_seed_different_view(channels):
    transform = TrainTransform(32, MEAN[:channels], STD[:channels], config=AugmentConfig(erase_prob=0.5))
    image = _images(channels)[0]
    views = [transform(image, seed) for seed in (7, 7, 8)]
    assert views[0].shape == (channels, 32, 32) and views[0].dtype == torch.float32
    assert torch.equal(views[0], views[1])
    assert not torch.equal(views[0], views[2])
    assert len({transform(image, seed).sum().item() for seed in range(10)}) == 10


@pytest.mark.parametrize("preset", ["light", "full", "erase_always"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 28), (3, 64)])
def test_train_views_equal_the_torchvision_pipeline_bit_for_bit(preset, channels, size):
    # `batch` draws each image's parameters itself and normalises the batch at once; a logit store
    # holds the teacher's answer to the pipeline's view, so every view must equal the v2.Compose
    # reference under the same seed, bit for bit (mixed sizes in one batch, as image folders give).
    config = {"erase_always": AugmentConfig(erase_prob=1.0, randaugment_ops=0)}.get(preset) or AUGMENT_PRESETS[preset]
    transform = TrainTransform(32, MEAN[:channels], STD[:channels], config=config)
    images = list(_images(channels, count=40, size=size)) + list(_images(channels, count=2, size=size + 9))
    seeds = [sample_seed(3, 1, f"img{i}") for i in range(len(images))]
    views = transform.batch(images, seeds)
    assert views.shape == (len(images), channels, 32, 32) and views.dtype == torch.float32
    for image, seed, view in zip(images, seeds, views):
        with seeded_rng(seed):
            expected = transform.pipeline(image)
        assert torch.equal(view, expected)
        assert torch.equal(transform(image, seed), expected)
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        transform.batch(images[:2], seeds[:1])


def test_transform_leaves_the_global_rng_alone():
    transform = TrainTransform(32, MEAN, STD)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    transform(_images()[0], 5)
    assert torch.equal(torch.rand(3), expected)


def test_eval_transform_is_deterministic_and_crops():
    transform = EvalTransform(24, MEAN, STD, crop_pct=0.875)
    image = _images(size=40)[0]
    out = transform(image, 1)
    assert out.shape == (3, 24, 24)
    assert torch.equal(out, transform(image, 2))


@pytest.mark.parametrize("size, img_size, crop_pct", [((28, 28), 32, 1.0), ((40, 50), 24, 0.875), ((32, 32), 32, 1.0)])
def test_eval_transform_matches_torchvision_per_image_and_per_batch(size, img_size, crop_pct):
    # The transform calls torchvision's kernels directly and skips no-op steps: the result must be
    # bit-identical to the plain v2 pipeline, for one image and for a batch.
    reference = v2.Compose(
        [
            v2.Resize(round(img_size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    transform = EvalTransform(img_size, MEAN, STD, crop_pct=crop_pct)
    images = torch.randint(0, 256, (5, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([reference(image) for image in images])
    assert expected.shape == (5, 3, img_size, img_size)
    assert torch.equal(torch.stack([transform(image) for image in images]), expected)
    assert torch.equal(transform(images), expected)
    assert torch.equal(
        images, torch.randint(0, 256, (5, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )  # input untouched
    with pytest.raises(TypeError, match="uint8"):
        transform(images.float())


def test_eval_transform_description_names_every_setting():
    # A static store records this text as the identity of the view its logits came from.
    base = EvalTransform(24, MEAN, STD)
    assert repr(base) == repr(EvalTransform(24, MEAN, STD))
    others = [
        EvalTransform(24, MEAN, STD, crop_pct=0.875),
        EvalTransform(32, MEAN, STD),
        EvalTransform(24, (0.5, 0.5, 0.5), STD),
        EvalTransform(24, MEAN, (0.5, 0.5, 0.5)),
    ]
    assert len({repr(base), *map(repr, others)}) == 5


@pytest.mark.parametrize("bad", [dict(hflip=1.5), dict(mixup_alpha=-1.0), dict(scale=(0.5, 0.1)), dict(mix_prob=-0.1)])
def test_bad_config_names_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**bad)


def test_bad_seed_and_sizes_raise():
    with pytest.raises(ValueError, match="seed=-1"):
        TrainTransform(32, MEAN, STD)(_images()[0], -1)
    with pytest.raises(ValueError, match="img_size=0"):
        EvalTransform(0, MEAN, STD)
    with pytest.raises(ValueError, match="num_classes=0"):
        PairedMix(0)


def test_paired_mix_pairs_flipped_order_and_replays_from_the_pair_alone():
    images = _images(count=6).float()
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    seeds = [11, 12, 13, 14, 15, 16]
    mix = PairedMix(6)
    mixed, targets = mix(images, labels, seeds)
    assert mixed.shape == images.shape and targets.shape == (6, 6)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    for i in range(3):
        j = 5 - i
        # Only the two labels of the pair appear in each target.
        assert set(targets[i].nonzero().flatten().tolist()) <= {i, j}
        # Replay one pair alone, in either order: bit-identical.
        again, again_targets = mix(images[[j, i]], labels[[j, i]], [seeds[j], seeds[i]])
        assert torch.equal(again[1], mixed[i]) and torch.equal(again[0], mixed[j])
        assert torch.equal(again_targets[1], targets[i])
    other, _ = mix(images, labels, [s + 100 for s in seeds])
    assert not torch.equal(other, mixed)


def test_paired_mix_off_and_odd_batch():
    images = _images(count=3).float()
    labels = torch.tensor([0, 1, 2])
    unmixed, targets = PairedMix(3, AugmentConfig(mix_prob=0.0))(images, labels, [1, 2, 3])
    assert torch.equal(unmixed, images) and torch.equal(targets, torch.eye(3))
    mixed, targets = PairedMix(3)(images, labels, [1, 2, 3])
    assert torch.equal(mixed[1], images[1]) and torch.equal(targets[1], torch.eye(3)[1])  # the middle pairs with itself
    with pytest.raises(ValueError, match="one entry per sample"):
        PairedMix(3)(images, labels, [1, 2])
    with pytest.raises(ValueError, match="labels must be in"):
        PairedMix(2)(images, labels, [1, 2, 3])


def test_cutmix_only_and_mixup_only_use_their_op():
    images = _images(count=2).float()
    labels = torch.tensor([0, 1])
    mixup_only = PairedMix(2, AugmentConfig(cutmix_alpha=0.0))
    mixed, targets = mixup_only(images, labels, [3, 4])
    lam = targets[0, 0]
    assert torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[1], atol=1e-4)
    cutmix_only = PairedMix(2, AugmentConfig(mixup_alpha=0.0))
    mixed, _ = cutmix_only(images, labels, [3, 4])
    from_first = (mixed[0] == images[0]) | (mixed[0] == images[1])
    assert bool(from_first.all())  # CutMix copies pixels, it never blends them


REPLAY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from tinyvit_lib.augment import AugmentConfig, PairedMix, TrainTransform

    def replay(global_seed):
        torch.manual_seed(global_seed)  # the global RNG state must not matter
        images = torch.randint(0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        transform = TrainTransform(32, (0.3,), (0.35,), config=AugmentConfig(erase_prob=0.5))
        views = torch.stack([transform(image, 1000 + i) for i, image in enumerate(images)])
        mixed, targets = PairedMix(10)(views, torch.tensor([1, 2, 3, 4]), [1000, 1001, 1002, 1003])
        return {"views": views, "mixed": mixed, "targets": targets}

    if __name__ == "__main__":
        torch.save(replay(int(sys.argv[2])), sys.argv[1])
""")


def test_replay_is_bit_identical_in_another_process(tmp_path):
    out = tmp_path / "replay.pt"
    subprocess.run([sys.executable, "-c", REPLAY_SCRIPT, str(out), "0"], check=True, cwd=REPO)
    there = torch.load(out)
    namespace = {"__name__": "replay"}
    exec(compile(REPLAY_SCRIPT, "replay", "exec"), namespace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and another thread count
    try:
        here = namespace["replay"](99)
    finally:
        torch.set_num_threads(threads)
    for key in ("views", "mixed", "targets"):
        assert torch.equal(there[key], here[key]), key
