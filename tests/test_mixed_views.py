"""Mixed views replayed from a store (function matching): partners drawn per epoch over the whole
dataset, so a mixed view is rebuilt bit for bit whatever the batch size, data order or subset."""

import numpy as np
import pytest
import torch
from test_logit_store import tiny_teacher

from tinyvit_lib import MIX_PRESETS, AugmentConfig, get_dataset
from tinyvit_lib.augment import MixConfig
from tinyvit_lib.data import per_class_subset
from tinyvit_lib.distill import OnlineTeacher, StoredTeacher, _replayed_view, precompute, verify_store
from tinyvit_lib.logit_store import MANIFEST, LogitStore, StoreMismatch, describe_store, record_dtype
from tinyvit_lib.trainer import TrainConfig, train

LIGHT = AugmentConfig(randaugment_ops=0, erase_prob=0.0, scale=(0.5, 1.0))
PRESETS = ("full", "function-matching")


def mixed(preset: str = "full", n: int = 96, mix: bool = True, data_seed: int = 0):
    config = MIX_PRESETS[preset] if mix else None
    return get_dataset("synthetic", split="train", num_samples=n, augment=LIGHT, mix=config, data_seed=data_seed)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_mixed_view_is_the_same_in_any_batch_order_or_subset(preset):
    dataset = mixed(preset)
    dataset.set_epoch(1)
    whole = dataset.__getitems__(list(range(len(dataset))))
    shuffled = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    for batch_size in (1, 7):  # two student batch sizes, in a shuffled order
        for start in range(0, len(dataset), batch_size):
            for image, target, i in dataset.__getitems__(shuffled[start : start + batch_size]):
                assert torch.equal(image, whole[i][0]) and torch.equal(target, whole[i][1])
    subset = per_class_subset(dataset, 3)
    subset.set_epoch(1)
    for position, (image, target, _) in enumerate(subset.__getitems__(list(range(len(subset))))):
        parent_image, parent_target, _ = whole[subset.indices[position]]
        assert torch.equal(image, parent_image) and torch.equal(target, parent_target)
    targets = torch.stack([t for _, t, _ in whole])
    assert torch.allclose(targets.sum(1), torch.ones(len(dataset)))
    assert (targets.max(1).values < 1).float().mean() > 0.9  # nearly every view is a mix of two labels


def test_the_rebuilt_mixed_view_is_the_teachers_view_bit_for_bit(tmp_path):
    # The student sees __getitems__'s view; the teacher saw the precompute's; verify rebuilds it from
    # the store alone (seed, partner, the partner's seed). All three must agree to fp16 rounding of
    # the stored logits, and the record names the partner the loader used.
    teacher, dataset = tiny_teacher(), mixed()
    store, _ = precompute(
        teacher, dataset, tmp_path / "s", k=10, mode="replay", epochs=2, batch_size=32, progress=False
    )
    assert store.header.mix == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0, "mix_switch_prob": 0.5}
    assert store.header.dtype == record_dtype(10, 10, mixed=True) and store.header.dtype.itemsize == 16 + 4 * 10
    assert describe_store(tmp_path / "s")["bytes_per_record"] == 56
    online, stored = OnlineTeacher(teacher), StoredTeacher.open(tmp_path / "s", dataset, epochs=2)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        ids = torch.tensor([5, 0, 77, 31, 60])
        records = store.records(epoch, ids.numpy())
        assert records["partner"].tolist() == dataset.partners(ids.tolist(), epoch)
        images = torch.stack([dataset[int(i)][0] for i in ids])
        for i, record, image in zip(ids.tolist(), records, images):  # rebuilt from the store alone: bit for bit
            assert torch.equal(_replayed_view(store, dataset, epoch, i, record), image)
        stored_probs, online_probs = stored.logits(images, ids, epoch).softmax(-1), online.logits(images).softmax(-1)
        assert torch.allclose(stored_probs, online_probs, atol=2e-3)
    report = verify_store(store, teacher, dataset, samples=64)
    assert report["ok"] and report["max_value_error"] <= report["value_tolerance"]


def test_a_mixed_store_refuses_students_that_mix_otherwise(tmp_path):
    teacher = tiny_teacher()
    precompute(teacher, mixed(), tmp_path / "s", k=4, mode="replay", epochs=1, batch_size=32, progress=False)
    with pytest.raises(StoreMismatch, match="mix: store .*mixup_alpha.*0.8.*data views not mixed"):
        StoredTeacher.open(tmp_path / "s", mixed(mix=False))
    with pytest.raises(StoreMismatch, match="mix: store .*0.8.*data .*mixup_alpha': 1.0"):
        StoredTeacher.open(tmp_path / "s", mixed("function-matching"))
    with pytest.raises(StoreMismatch, match="the data mixes nothing"):
        verify_store(LogitStore.open(tmp_path / "s"), teacher, mixed(mix=False))
    precompute(teacher, mixed(mix=False), tmp_path / "plain", k=4, mode="replay", epochs=1, progress=False)
    with pytest.raises(StoreMismatch, match="mix: store views not mixed, data .*mixup_alpha"):
        StoredTeacher.open(tmp_path / "plain", mixed())
    dataset = mixed()
    stored = StoredTeacher.open(tmp_path / "s", dataset)
    dataset.partners = lambda indices, epoch: [(i + 1) % len(dataset) for i in indices]  # a loader pairing otherwise
    with pytest.raises(ValueError, match="epoch 0: the data loader mixes these samples with other partners"):
        stored.logits_for_ids(torch.arange(4), 0)


def test_mixed_views_are_refused_where_they_cannot_be_stored(tmp_path):
    for augment, mix, error, match in (
        (None, MIX_PRESETS["full"], ValueError, "mixes augmented views, but augment=None"),
        (LIGHT, MixConfig(mix_prob=0.0), ValueError, "mixes nothing"),
        (LIGHT, True, TypeError, "mix=True must be a MixConfig"),
    ):
        with pytest.raises(error, match=match):
            get_dataset("synthetic", split="train", num_samples=8, augment=augment, mix=mix)
    with pytest.raises(ValueError, match="over the dataset, not a subset"):
        precompute(tiny_teacher(), per_class_subset(mixed(), 2), tmp_path / "sub", k=4, mode="replay", progress=False)
    assert not (tmp_path / "sub").exists()


def test_truncated_or_flipped_mixed_store_is_refused(tmp_path):
    precompute(tiny_teacher(), mixed(), tmp_path / "s", k=4, mode="replay", epochs=1, batch_size=32, progress=False)
    data_file = tmp_path / "s" / "epoch-0000.bin"
    raw = bytearray(data_file.read_bytes())
    raw[8 + 3] ^= 0x01  # a bit of the first record's partner
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        LogitStore.open(tmp_path / "s")
    data_file.write_bytes(bytes(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        LogitStore.open(tmp_path / "s")


def test_a_version_1_store_reads_as_an_unmixed_one(tmp_path):
    import json

    from tinyvit_lib.logit_store import manifest_digest

    dataset = mixed(mix=False, n=32)
    store, _ = precompute(tiny_teacher(), dataset, tmp_path / "s", k=4, mode="replay", progress=False)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["version"] = 1  # what version 1 wrote: no `mix` or `data` in the header, `base_seed`, the same records
    header = manifest["header"]
    del header["mix"], header["data"]
    header["base_seed"] = header.pop("data_seed")
    # and its view description listed the mixing settings: the same view, described as it was then
    header["transform"] = header["transform"].replace(
        "))", ", mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, mix_switch_prob=0.5))"
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    old = LogitStore.open(tmp_path / "s", expect=store.header)
    assert old.header.mix == {} and np.array_equal(old.records(0, np.arange(32)), store.records(0, np.arange(32)))
    StoredTeacher.open(tmp_path / "s", dataset)
    with pytest.raises(StoreMismatch, match="mix: store views not mixed"):
        StoredTeacher.open(tmp_path / "s", mixed(n=32))


def _online_and_replay_students(tmp_path, dataset) -> tuple[float, list[float], list[float]]:
    """Train one student from an online teacher and one from a replay store of the same views: the
    weights' distance relative to the distance they moved, and both runs' per-epoch losses."""
    teacher = tiny_teacher()
    precompute(teacher, dataset, tmp_path / "s", k=10, mode="replay", epochs=2, batch_size=16, progress=False)
    # fp32 (no autocast, wherever bf16 is native): the comparison is of the targets, not of bf16's rounding
    config = TrainConfig(epochs=2, batch_size=16, alpha=1.0, clip_grad=0.0, amp=False)
    start = torch.cat([p.detach().flatten() for p in tiny_teacher(seed=1).parameters()])
    weights, losses = {}, {}
    for name, source in (("online", OnlineTeacher(teacher)), ("store", StoredTeacher.open(tmp_path / "s", dataset))):
        student = tiny_teacher(seed=1).train()
        result = train(student, dataset, None, config, run_dir=tmp_path / name, teacher=source, progress=False)
        weights[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
        losses[name] = [record["train_loss"] for record in result.history]
    relative = float((weights["online"] - weights["store"]).norm() / (weights["online"] - start).norm())
    return relative, losses["online"], losses["store"]


@pytest.mark.parametrize("preset", PRESETS)
def test_online_and_replay_students_on_mixed_views_agree_as_unmixed_ones_do(tmp_path, preset):
    # The stored targets differ from the online teacher's by fp16 rounding only; AdamW turns that
    # into a few percent of the distance the weights move in 8 steps, mixed or not.
    mixed_gap, online, store = _online_and_replay_students(tmp_path / "mixed", mixed(preset, n=64))
    plain_gap, _, _ = _online_and_replay_students(tmp_path / "plain", mixed(n=64, mix=False))
    np.testing.assert_allclose(online, store, rtol=1e-4)
    assert mixed_gap < 0.1 and mixed_gap < 2 * plain_gap, (mixed_gap, plain_gap)
