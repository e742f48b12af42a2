"""Replayable augmentation: seeds, per-sample transforms and paired Mixup/CutMix."""

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from tinyvit_lib.augment import (
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


@pytest.mark.parametrize(
    "channels, shape, scale, hwc_memory",
    [
        (3, (20, 50), (0.08, 1.0), False),  # non-square, as image folders give
        (1, (4, 90), (0.5, 1.0), False),  # no box of a 3/4-4/3 ratio fits: v2's central-crop fallback
        (1, (90, 4), (0.5, 1.0), False),  # the fallback for a tall image
        (3, (32, 32), (1.0, 1.0), False),  # the whole image at the output size: no resize at all
        (3, (33, 31), (0.9, 1.0), False),  # boxes that span the full width or height
        (3, (32, 32), (0.08, 0.5), True),  # channels-last images: v2 keeps their strides
    ],
)
def test_train_views_equal_the_pipeline_on_any_shape(channels, shape, scale, hwc_memory):
    # `batch` draws the crop box itself (v2's draws and arithmetic) and resizes without v2's
    # wrapper: every corner of that rewrite must still give v2's view bit for bit.
    config = replace(AUGMENT_PRESETS["light"], scale=scale, hflip=0.5)
    transform = TrainTransform(32, MEAN[:channels], STD[:channels], config=config)
    generator = torch.Generator().manual_seed(1)
    images = list(torch.randint(0, 256, (60, channels, *shape), generator=generator, dtype=torch.uint8))
    if hwc_memory:
        images = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in images]  # (C, H, W) shape
    seeds = [sample_seed(5, 0, f"img{i}") for i in range(len(images))]
    views = transform.batch(images, seeds)
    for image, seed, view in zip(images, seeds, views):
        assert torch.equal(view, transform.reference(image, seed))


def test_a_bad_seed_mid_batch_leaves_the_global_rng_alone():
    transform = TrainTransform(32, MEAN, STD)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.raises(ValueError, match="seed=-5"):
        transform.batch(list(_images(count=3)), [1, 2, -5])
    assert torch.equal(torch.rand(3), expected)


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


@pytest.mark.parametrize(
    "config, bad",
    [
        (AugmentConfig, dict(hflip=1.5)),
        (AugmentConfig, dict(randaugment_ops=-1)),
        (AugmentConfig, dict(scale=(0.5, 0.1))),
        (MixConfig, dict(mixup_alpha=-1.0)),
        (MixConfig, dict(mix_prob=-0.1)),
        (MixConfig, dict(mix_switch_prob=1.5)),
    ],
)
def test_bad_config_names_the_field(config, bad):
    field, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=re.escape(f"{field}={value}")):
        config(**bad)


def test_mixing_is_apart_from_the_view():
    # One image's view has no mixing settings; a mixed store records a MixConfig's dict, these very keys.
    assert not {"mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob"} & set(AugmentConfig().to_dict())
    assert MIX_PRESETS["full"] == MixConfig()
    assert MIX_PRESETS["full"].to_dict() == {
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mix_prob": 1.0,
        "mix_switch_prob": 0.5,
    }
    assert MIX_PRESETS["function-matching"].to_dict() == {
        "mixup_alpha": 1.0,
        "cutmix_alpha": 0.0,
        "mix_prob": 1.0,
        "mix_switch_prob": 0.0,
    }
    assert all(config.mixing for config in MIX_PRESETS.values())
    assert not MixConfig(mix_prob=0.0).mixing and not MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0).mixing


def test_bad_seed_and_sizes_raise():
    with pytest.raises(ValueError, match="seed=-1"):
        TrainTransform(32, MEAN, STD)(_images()[0], -1)
    with pytest.raises(ValueError, match="img_size=0"):
        EvalTransform(0, MEAN, STD)
    with pytest.raises(ValueError, match="num_classes=0"):
        PairMix(0, MixConfig())


FULL, FUNCTION_MATCHING = MIX_PRESETS["full"], MIX_PRESETS["function-matching"]


@pytest.mark.parametrize("size", [10, 11])
def test_mix_partners_pair_every_position_once_from_seed_and_epoch(size):
    partner = mix_partners(size, data_seed=3, epoch=1)
    assert sorted(partner.tolist()) == list(range(size)) and torch.equal(partner[partner], torch.arange(size))
    assert int((partner == torch.arange(size)).sum()) == size % 2  # an odd count leaves one alone
    assert torch.equal(partner, mix_partners(size, data_seed=3, epoch=1))
    assert not torch.equal(partner, mix_partners(size, data_seed=3, epoch=2))
    assert not torch.equal(partner, mix_partners(size, data_seed=4, epoch=1))


def test_pair_mix_members_agree_whichever_is_computed_first():
    a, b = _images(count=2).float()
    mix = PairMix(6, FUNCTION_MATCHING)  # Mixup, lam uniform in [0, 1]
    mixed_a, target_a = mix(a, b, 1, 4, 101, 202)
    mixed_b, target_b = mix(b, a, 4, 1, 202, 101)
    lam = float(target_a[1])
    assert (
        0 < lam < 1
        and float(target_b[4]) == lam
        and torch.allclose(target_a + target_b, target_a.new_tensor([0, 1, 0, 0, 1, 0]))
    )
    assert torch.allclose(mixed_a, lam * a + (1 - lam) * b, atol=1e-4)
    assert torch.allclose(mixed_b, lam * b + (1 - lam) * a, atol=1e-4)
    again, _ = mix(a, b, 1, 4, 101, 202)  # the same pair again: bit for bit
    assert torch.equal(again, mixed_a)
    other, _ = mix(a, b, 1, 4, 101, 203)
    assert not torch.equal(other, mixed_a)


@pytest.mark.parametrize(
    "config",
    [FULL, FUNCTION_MATCHING, replace(FULL, mixup_alpha=0.0, mix_prob=0.7)],
    ids=["full", "function-matching", "cutmix-sometimes"],
)
@pytest.mark.parametrize("channels, shape", [(3, (32, 32)), (1, (24, 40))])
def test_pair_mix_equals_torchvision_on_the_pair_bit_for_bit(config, channels, shape):
    # `__call__` computes one row of v2's two-image batch; mixed stores replay these views, so they
    # must equal v2's (`reference`) bit for bit, for both members of every pair.
    mix = PairMix(7, config)
    views = torch.randn(40, channels, *shape, generator=torch.Generator().manual_seed(2))
    kinds = set()
    for i in range(0, 40, 2):
        a, b, seed_a, seed_b = views[i], views[i + 1], sample_seed(0, 1, f"a{i}"), sample_seed(0, 1, f"b{i}")
        for args in ((a, b, i % 7, 3, seed_a, seed_b), (b, a, 3, i % 7, seed_b, seed_a)):
            mixed, target = mix(*args)
            expected, expected_target = mix.reference(*args)
            assert torch.equal(mixed, expected) and torch.equal(target, expected_target)
            kinds.add(
                "unmixed" if torch.equal(mixed, args[0]) else "cut" if ((mixed == a) | (mixed == b)).all() else "blend"
            )
    assert kinds >= ({"cut"} if config.mixup_alpha == 0 else {"blend"})


def test_pair_mix_off_and_one_op_at_a_time():
    a, b = _images(count=2).float()
    unmixed, target = PairMix(3, replace(FULL, mix_prob=0.0))(a, b, 0, 1, 5, 6)
    assert torch.equal(unmixed, a) and torch.equal(target, torch.eye(3)[0])
    alone, target = PairMix(3, FULL)(a, a, 2, 2, 5, 5)  # a view paired with itself
    assert torch.equal(alone, a) and torch.equal(target, torch.eye(3)[2])
    cutmix_only = PairMix(2, replace(FULL, mixup_alpha=0.0))
    mixed, _ = cutmix_only(a, b, 0, 1, 3, 4)
    assert bool(((mixed == a) | (mixed == b)).all())  # CutMix copies pixels, it never blends them
    with pytest.raises(ValueError, match="label=3 outside"):
        PairMix(3, FULL)(a, b, 3, 1, 5, 6)
    with pytest.raises(ValueError, match="cannot mix"):
        PairMix(3, FULL)(a, b[:1], 0, 1, 5, 6)


REPLAY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from tinyvit_lib.augment import AugmentConfig, MixConfig, PairMix, TrainTransform

    def replay(global_seed):
        torch.manual_seed(global_seed)  # the global RNG state must not matter
        images = torch.randint(0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        transform = TrainTransform(32, (0.3,), (0.35,), config=AugmentConfig(erase_prob=0.5))
        views = torch.stack([transform(image, 1000 + i) for i, image in enumerate(images)])
        mix = PairMix(10, MixConfig())
        pairs = [mix(views[i], views[3 - i], i + 1, 4 - i, 1000 + i, 1003 - i) for i in range(4)]
        mixed, targets = (torch.stack(column) for column in zip(*pairs))
        return {"views": views, "mixed": mixed, "targets": targets}

    if __name__ == "__main__":
        torch.save(replay(int(sys.argv[2])), sys.argv[1])
""")


def test_replay_is_bit_identical_in_another_process(tmp_path):
    out = tmp_path / "replay.pt"
    env = dict(os.environ, OMP_NUM_THREADS="2")  # two threads there, one here
    subprocess.run([sys.executable, "-c", REPLAY_SCRIPT, str(out), "0"], check=True, cwd=REPO, env=env)
    there = torch.load(out)
    namespace = {"__name__": "replay"}
    exec(compile(REPLAY_SCRIPT, "replay", "exec"), namespace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = namespace["replay"](99)
    finally:
        torch.set_num_threads(threads)
    for key in ("views", "mixed", "targets"):
        assert torch.equal(there[key], here[key]), key
