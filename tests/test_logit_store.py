"""The sparse logit store: format, lookups, refusals, resumable and sharded precompute, verify and
describe, the loss from stored logits (and the original plan's `FastDistillation` facade)."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyvit_lib import MIX_PRESETS, AugmentConfig, TinyViT, TinyViTConfig, get_dataset
from tinyvit_lib.compat import FastDistillation
from tinyvit_lib.data import SubsetWithIDs, per_class_subset
from tinyvit_lib.distill import (
    DistillationLoss,
    OnlineTeacher,
    StoredTeacher,
    VerifyTolerance,
    dataset_seeds,
    precompute,
    topk_mass,
    verify_store,
)
from tinyvit_lib.logit_store import (
    LogitStore,
    StoreHeader,
    StoreMismatch,
    StoreWriter,
    describe_store,
    encode_records,
    manifest_digest,
    official_record_bytes,
    rebuild_logits,
    record_dtype,
)

REPO = Path(__file__).resolve().parent.parent
LIGHT = AugmentConfig(randaugment_ops=0, erase_prob=0.0, scale=(0.5, 1.0))


def tiny_teacher(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    model = TinyViT(
        TinyViTConfig(
            embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), num_classes=10, img_size=32
        )
    )
    with torch.no_grad():  # make the logits spread out, so top-k choices are not ties
        model.head.fc.weight.mul_(50)
    return model.eval()


def data(augment=None, n: int = 96, mix: bool = False):
    return get_dataset(
        "synthetic", split="train", num_samples=n, augment=augment, mix=MIX_PRESETS["full"] if mix else None
    )


def test_record_size_is_within_8_bytes_of_official():
    for k in (1, 5, 10, 100):
        assert record_dtype(k, 1000).itemsize == 12 + 4 * k == official_record_bytes(k) + 8
    assert record_dtype(5, 100_000)["index"].base == np.dtype("<i4")


def test_rebuild_is_exact_when_k_is_the_class_count():
    logits = torch.randn(4, 10) * 3
    rebuilt = rebuild_logits(encode_records(logits, [1, 2, 3, 4], k=10), 10)
    for T in (0.5, 1.0, 4.0):
        assert torch.allclose((rebuilt / T).softmax(-1), (logits / T).softmax(-1), atol=2e-3)


def test_sparse_rebuild_keeps_the_top_k_and_the_total_remainder():
    logits = torch.randn(3, 20) * 2
    p = logits.softmax(-1)
    q = rebuild_logits(encode_records(logits, [0, 0, 0], k=5), 20).softmax(-1)
    top = logits.topk(5, dim=1).indices
    assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=3e-3)  # fp16 logits
    mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, top, False)
    assert torch.allclose((q * mask).sum(1), (p * mask).sum(1), atol=3e-3)  # the remainder's total
    rest = q[mask].view(3, 15)
    assert torch.allclose(rest, rest[:, :1].expand(-1, 15))  # spread uniformly
    # a tail far below the top (a gap of 40 over 995 classes, a share of 1e-15) keeps its exact value
    peaked = torch.zeros(2, 1000)
    peaked[:, :5] = 40.0
    assert (encode_records(peaked, [0, 0], k=5)["rest"] == 0.0).all()
    for bad in (float("nan"), float("inf"), 7e4):  # a store keeps finite fp16 logits only
        broken = logits.clone()
        broken[1, 3] = bad
        with pytest.raises(ValueError, match=f"a logit of {bad} for the batch's row 1"):
            encode_records(broken, [0, 0, 0], k=5)


def test_static_store_round_trip_and_lookups(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    store, stats = precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    assert stats.images == 96 and store.bytes_per_record == 12 + 16
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["epoch-0000.bin", "manifest.json"]
    images = torch.stack([dataset[i][0] for i in (5, 17, 90)])
    expected = teacher(images).topk(4, dim=1)
    records = LogitStore.open(tmp_path / "s").records(0, [5, 17, 90])
    assert (records["index"] == expected.indices.numpy()).all()
    assert np.allclose(records["value"].astype(np.float32), expected.values.detach().numpy(), atol=1e-2)
    assert (records["seed"] == -1).all()
    with pytest.raises(IndexError, match=r"sample id\(s\) \[96\] not in logit store"):
        store.records(0, [3, 96])
    report = verify_store(store, teacher, dataset, samples=32)
    assert report["records"] == 32 and report["max_value_error"] <= report["value_tolerance"]
    assert report["index_mismatch_rate"] == 0 and report["ok"]


def test_refusals(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    store, _ = precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    other = store.header.__class__(**dict(store.header.to_dict(), k=5))
    with pytest.raises(StoreMismatch, match="k: store 4, asked 5"):
        LogitStore.open(tmp_path / "s", expect=other)
    with pytest.raises(StoreMismatch, match="dataset size: store 96, data 64"):
        StoredTeacher.open(tmp_path / "s", data(n=64))
    with pytest.raises(StoreMismatch, match="img_size: store 32, data 28"):
        StoredTeacher.open(tmp_path / "s", get_dataset("synthetic", split="train", num_samples=96, img_size=28))
    bad_arguments = [
        (dict(k=11), "k=11 must be between 1 and the class count 10"),
        (dict(k=0), "k=0 must be between 1"),
        (dict(epochs=3), "epochs=3: a static store holds one record per image"),
        (dict(batch_size=0), "batch_size=0 must be >= 1"),
        (dict(num_workers=-1), "num_workers=-1 must be >= 0"),
        (dict(mode="sometimes"), "mode must be 'static' or 'replay'"),
    ]
    for arguments, message in bad_arguments:
        with pytest.raises(ValueError, match=message):
            precompute(teacher, dataset, tmp_path / "t", **{"k": 4, "progress": False, **arguments})
    with pytest.raises(ValueError, match="epochs=0 must be >= 1"):
        precompute(teacher, data(augment=LIGHT), tmp_path / "t", k=4, mode="replay", epochs=0, progress=False)
    with pytest.raises(ValueError, match="static store records the evaluation view"):
        precompute(teacher, data(augment=LIGHT), tmp_path / "t", k=4, progress=False)
    assert not (tmp_path / "t").exists()  # every argument is checked before anything is written
    with pytest.raises(FileExistsError, match="already holds a complete logit store"):
        precompute(teacher, dataset, tmp_path / "s", k=4, progress=False)


def test_positions_and_ids_are_integers_inside_the_store(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    store, _ = precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    for positions in ([1.9], [True, False], 5):  # not rounded, not read as 0/1, not a scalar view
        with pytest.raises(ValueError, match="positions must be a 1-D sequence of integers"):
            store.records(0, positions)
    assert store.records(0, []).shape == (0,) and store.records(0, torch.tensor([3]))["seed"].shape == (1,)
    stored = StoredTeacher.open(tmp_path / "s", per_class_subset(dataset, 3))  # a subset: IDs map to positions
    with pytest.raises(IndexError, match=r"sample id\(s\) \[-1\] not in the dataset \(30 samples\)"):
        stored.logits_for_ids(torch.tensor([0, -1]), 0)  # it would have wrapped to the subset's last sample
    with pytest.raises(ValueError, match=r"topk_mass: \[0, -1.0\] out of range"):
        topk_mass(torch.randn(2, 10), [0, 3], temperature=-1.0)


def test_verify_fails_a_teacher_that_now_gives_nan(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    store, _ = precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, x):
            return self.inner(x) * float("nan")

    report = verify_store(store, Broken(), dataset, samples=16)
    assert report["max_value_error"] == float("inf") and not report["ok"]  # max(0.0, nan) would have passed it
    # other data, or a subset (replayed by position, it would blame the store), is refused
    with pytest.raises(StoreMismatch, match="does not fit this training data"):
        verify_store(store, teacher, data(n=64), samples=4)
    with pytest.raises(StoreMismatch, match="not over a subset or another order"):
        verify_store(store, teacher, per_class_subset(dataset, 3), samples=4)


def test_a_writer_takes_only_the_next_batch_of_its_own_records(tmp_path):
    header = small_header()
    for settings, message in (
        (dict(batch_size=2.5), "batch_size=2.5 must be an integer"),
        (dict(batch_size=4, world_size=0), "world_size=0 must be >= 1"),
        (dict(batch_size=4, rank=3, world_size=2), "rank=3 must be below world_size=2"),
    ):
        with pytest.raises(ValueError, match=message):
            StoreWriter(tmp_path / "w", header, **settings)
    with pytest.raises(ValueError, match="header cannot be written as JSON"):
        StoreWriter(tmp_path / "w", small_header(teacher=dict(name=tmp_path)), batch_size=4)
    assert not (tmp_path / "w").exists()  # refused before the folder was made
    records = encode_records(torch.randn(4, 10), [-1] * 4, k=3)
    with StoreWriter(tmp_path / "w", header, batch_size=4) as writer:
        with pytest.raises(ValueError, match=r"records of dtype .* for a store of .* \(k=3\)"):
            writer.append(0, encode_records(torch.randn(4, 10), [-1] * 4, k=5))  # another k: not cut silently
        with pytest.raises(ValueError, match=r"epoch=1 outside the store's \[0, 1\)"):
            writer.append(1, records)
        with pytest.raises(ValueError, match="takes 4 records next, not 3"):
            writer.append(0, records[:3])
        writer.append(0, records)
        writer.append(0, records)
        with pytest.raises(ValueError, match="takes no more batches next, not 4"):  # a batch appended twice
            writer.append(0, records)
        store = writer.finish()
    assert store.header.size == 8 and (store.records(0, np.arange(4, 8))["index"] == records["index"]).all()


def test_truncated_corrupted_and_unfinished_stores_are_detected(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    records = tmp_path / "s" / "epoch-0000.bin"
    original = records.read_bytes()
    records.write_bytes(original[:-10])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        LogitStore.open(tmp_path / "s")
    records.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(ValueError, match="checksum mismatch"):
        LogitStore.open(tmp_path / "s")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "epoch-0000.part-000").write_bytes(original[:64])
    with pytest.raises(FileNotFoundError, match="unfinished precompute"):
        LogitStore.open(tmp_path / "half")


def test_subset_training_reads_the_full_store(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    precompute(teacher, dataset, tmp_path / "s", k=10, batch_size=32, progress=False)
    # Not a prefix: the subset's positions are not the store's, so the lookup must map them by ID.
    for subset in (per_class_subset(dataset, 3), SubsetWithIDs(dataset, list(range(len(dataset) - 1, -1, -3)))):
        stored = StoredTeacher.open(tmp_path / "s", subset)
        positions = torch.tensor([0, 3, 7, 20])
        images = torch.stack([subset[int(i)][0] for i in positions])
        probs = stored.logits(images, positions, epoch=0).softmax(-1)
        assert torch.allclose(probs, teacher(images).softmax(-1), atol=5e-3)


def test_replay_store_matches_online_teacher_on_the_same_views(tmp_path):
    """k = C: the stored loss equals the online loss up to fp16; k < C: only the sparse tail differs."""
    teacher, dataset = tiny_teacher(), data(augment=LIGHT)
    precompute(teacher, dataset, tmp_path / "full", k=10, mode="replay", epochs=2, batch_size=32, progress=False)
    precompute(teacher, dataset, tmp_path / "top3", k=3, mode="replay", epochs=2, batch_size=32, progress=False)
    loss = DistillationLoss(alpha=1.0, temperature=2.0)
    online = OnlineTeacher(teacher)
    student = torch.randn(8, 10)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        ids = torch.tensor([3, 7, 11, 20, 41, 50, 77, 95])
        images = torch.stack([dataset[int(i)][0] for i in ids])  # the views the student sees this epoch
        reference = loss(student, ids, online.logits(images, ids, epoch))
        full, top3 = (
            loss(student, ids, StoredTeacher.open(tmp_path / name, dataset).logits(images, ids, epoch))
            for name in ("full", "top3")
        )
        assert abs(full - reference) < 2e-3 * reference.abs() + 1e-4
        assert abs(top3 - reference) > abs(full - reference)  # the sparse approximation shows
        assert abs(top3 - reference) < 0.25 * reference.abs()
    with pytest.raises(ValueError, match="holds epochs 0..1, asked 2"):
        StoredTeacher.open(tmp_path / "full", dataset).logits(images, ids, 2)
    reseeded = get_dataset("synthetic", split="train", num_samples=96, augment=LIGHT, data_seed=1)
    with pytest.raises(StoreMismatch, match="data_seed: store 0, data 1"):
        StoredTeacher.open(tmp_path / "full", reseeded)


def test_stored_logits_need_sample_ids_not_images(tmp_path):
    teacher, dataset = tiny_teacher(), data(augment=LIGHT)
    precompute(teacher, dataset, tmp_path / "s", k=10, mode="replay", epochs=2, batch_size=32, progress=False)
    stored = StoredTeacher.open(tmp_path / "s", dataset)
    ids = torch.tensor([4, 9, 60])
    dataset.set_epoch(1)
    images = torch.stack([dataset[int(i)][0] for i in ids])
    by_id = stored.logits_for_ids(ids, epoch=1)
    assert by_id.device == torch.device("cpu") and torch.equal(by_id, stored.logits(images, ids, 1))
    assert torch.allclose(by_id.softmax(-1), teacher(images).softmax(-1), atol=5e-3)  # the view the student sees
    # The original plan's facade reads the same records from the IDs: its loss is the library's.
    fd = FastDistillation(k=10, temperature=2.0, alpha=0.7).load(tmp_path / "s", dataset)
    student, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    expected = DistillationLoss(0.7, 2.0)(student, labels, by_id)
    assert torch.equal(fd.compute_loss(student, ids, labels, epoch=1), expected)
    with pytest.raises(ValueError, match="holds epochs 0..1, asked 2"):
        fd.compute_loss(student, ids, labels, epoch=2)


def test_fast_distillation_facade(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    fd = FastDistillation(k=10, temperature=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="load a logit store first"):
        fd.compute_loss(torch.randn(2, 10), torch.tensor([0, 1]), torch.tensor([0, 1]))
    fd.precompute_logits(teacher, dataset, tmp_path / "s", batch_size=32, progress=False)
    with pytest.raises(ValueError, match="keeps k=10, this FastDistillation k=3"):
        FastDistillation(k=3).load(tmp_path / "s", dataset)
    fd.load(tmp_path / "s", dataset)
    images = torch.stack([dataset[i][0] for i in range(4)])
    logits = teacher(images).detach()
    assert fd.compute_loss(logits, torch.arange(4), torch.zeros(4, dtype=torch.long)) < 1e-3  # student == teacher


PRECOMPUTE_SCRIPT = """
    import sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from tests.test_logit_store import tiny_teacher, data, LIGHT
    from tinyvit_lib.distill import precompute
    {setup}
    precompute(tiny_teacher(), data(augment=LIGHT, n=256, mix={mix}), {path!r}, k=4, mode="replay", epochs=2,
               batch_size=8, progress=False)
"""


def _script(tmp_path: Path, path: Path, name: str, setup: str = "", mix: bool = False) -> Path:
    """A script that runs the replay precompute (of mixed views with `mix`) into `path` after the
    one-line statement `setup`."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(PRECOMPUTE_SCRIPT.format(repo=str(REPO), path=str(path), setup=setup, mix=mix)))
    return script


def wait_after_each_batch_until(release: str) -> None:
    """Make every `StoreWriter` of this process wait after each batch it appends until the file
    `release` exists: a precompute held in the middle of its write."""
    append = StoreWriter.append

    def append_then_wait(self: StoreWriter, epoch: int, records: np.ndarray) -> None:
        append(self, epoch, records)
        while not Path(release).exists():
            time.sleep(0.01)

    StoreWriter.append = append_then_wait


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def _store_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("mix", [False, True])
def test_precompute_resumes_after_sigkill_byte_identical(tmp_path, mix):
    reference = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, tmp_path / "ref", "ref.py", mix=mix))], env=_env()
    )
    victim_script = _script(tmp_path, tmp_path / "run", "run.py", mix=mix)
    victim = subprocess.Popen([sys.executable, str(victim_script)], env=_env())
    part = tmp_path / "run" / "epoch-0001.part-000"  # wait until the second epoch is under way
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and not (part.exists() and part.stat().st_size > 0):
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "manifest.json").exists(), "the run finished before it could be killed"
    with pytest.raises(FileNotFoundError, match="unfinished"):
        LogitStore.open(tmp_path / "run")
    assert subprocess.run([sys.executable, str(victim_script)], env=_env(), timeout=300).returncode == 0
    assert reference.wait(timeout=300) == 0
    assert _store_bytes(tmp_path / "run") == _store_bytes(tmp_path / "ref")


@pytest.mark.parametrize("mix", [False, True])
def test_sharded_precompute_equals_one_process(tmp_path, mix):
    single = subprocess.Popen([sys.executable, str(_script(tmp_path, tmp_path / "one", "one.py", mix=mix))], env=_env())
    sharded = tmp_path / "two.py"
    sharded.write_text(
        textwrap.dedent("""
        import torch.distributed as dist
        dist.init_process_group("gloo")
    """)
        + textwrap.dedent(PRECOMPUTE_SCRIPT.format(repo=str(REPO), path=str(tmp_path / "two"), setup="", mix=mix))
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29700 + os.getpid() % 200),
        str(sharded),
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)  # beside the single process
    assert out.returncode == 0, out.stderr[-3000:]
    assert single.wait(timeout=300) == 0
    assert _store_bytes(tmp_path / "two") == _store_bytes(tmp_path / "one")


def test_deriving_a_smaller_k_equals_precomputing_it(tmp_path):
    from tinyvit_lib.logit_store import derive_smaller_k

    teacher, dataset = tiny_teacher(), data(augment=LIGHT)
    replay = dict(mode="replay", epochs=2, batch_size=32, progress=False)
    big, _ = precompute(teacher, dataset, tmp_path / "k10", k=10, **replay)
    direct, _ = precompute(teacher, dataset, tmp_path / "k3", k=3, **replay)
    derived = derive_smaller_k(big, 3, tmp_path / "k3-derived")
    assert derived.header == direct.header
    for epoch in (0, 1):
        a, b = derived.records(epoch, np.arange(96)), direct.records(epoch, np.arange(96))
        assert (a["seed"] == b["seed"]).all() and (a["index"] == b["index"]).all() and (a["value"] == b["value"]).all()
        assert np.allclose(a["rest"], b["rest"], atol=5e-3)
    with pytest.raises(ValueError, match="k=10 must be between 1 and the store's k - 1"):
        derive_smaller_k(big, 10, tmp_path / "bad")
    with pytest.raises(ValueError, match="is the store derived from"):  # it would have removed its own source
        derive_smaller_k(big, 3, tmp_path / "k10")
    assert LogitStore.open(tmp_path / "k10").header.k == 10
    # a k=2 derivation where another store's k=3 lies is derived again; a folder of other files is left alone
    assert derive_smaller_k(big, 2, tmp_path / "k3-derived").header.k == 2
    shutil.copytree(tmp_path / "k3-derived", tmp_path / "mine")  # a k=2 store, and a file of the user's
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not a logit store's, such as \['notes.txt'\]: it is not removed"):
        derive_smaller_k(big, 3, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_precompute_or_reuse_rebuilds_a_store_made_by_another_teacher(tmp_path):
    from tinyvit_lib.distill import precompute_or_reuse

    dataset = data()
    _, first = precompute_or_reuse(tiny_teacher(0), dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    store, again = precompute_or_reuse(tiny_teacher(0), dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    assert first is not None and again is None  # the same teacher: reused
    other = tiny_teacher(1)
    store, rebuilt = precompute_or_reuse(other, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    assert rebuilt is not None and verify_store(store, other, dataset, samples=16)["index_mismatch_rate"] == 0
    # bad arguments are refused before the store they would replace is removed
    for bad, message in ((dict(batch_size=0), "batch_size=0 must be >= 1"), (dict(num_workers=-1), "num_workers=-1")):
        with pytest.raises(ValueError, match=message):
            precompute_or_reuse(tiny_teacher(2), dataset, tmp_path / "s", k=3, **dict(dict(batch_size=32), **bad))
    assert LogitStore.open(tmp_path / "s").header.k == 4
    # force removes a store, never a folder of other files
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "draft.tex").write_text("keep me")
    with pytest.raises(ValueError, match=r"not a logit store's, such as \['draft.tex'\]"):
        precompute_or_reuse(other, dataset, tmp_path / "papers", k=4, batch_size=32, force=True, progress=False)
    assert (tmp_path / "papers" / "draft.tex").read_text() == "keep me"


def test_precompute_or_reuse_rebuilds_an_unfinished_precompute_with_other_settings(tmp_path):
    from tinyvit_lib.distill import precompute_or_reuse

    dataset, teacher = data(), tiny_teacher(0)
    for pending in ('{"header": {}, "batch_size": 64, "world_size": 1}', "[1, 2]", "not json"):
        (tmp_path / "s").mkdir(exist_ok=True)
        (tmp_path / "s" / "pending.json").write_text(pending)  # left by another precompute, or damaged
        store, stats = precompute_or_reuse(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
        assert stats is not None and stats.images == len(dataset) and store.header.k == 4
        shutil.rmtree(tmp_path / "s")


def rewrite_records_keeping_the_checksums(store: Path, edit: Callable[[np.ndarray], None]) -> None:
    """Apply `edit` to the records of epoch 0 in place, then write the file's new checksum into the
    manifest and seal the manifest again: a store whose files and manifest are intact but whose
    records are wrong."""
    manifest = json.loads((store / "manifest.json").read_text())
    records_file = store / manifest["files"][0]["name"]
    records = np.fromfile(records_file, dtype=record_dtype(manifest["header"]["k"], manifest["header"]["num_classes"]))
    edit(records)
    records_file.write_bytes(records.tobytes())
    manifest["files"][0]["sha256"] = hashlib.sha256(records_file.read_bytes()).hexdigest()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def edit_a_value_keeping_the_checksum(store: Path, position: int, delta: float) -> None:
    """Move the top logit of one record of epoch 0 by `delta`, keeping every checksum valid."""

    def move(records: np.ndarray) -> None:
        records["value"][position, 0] += np.float16(delta)

    rewrite_records_keeping_the_checksums(store, move)


def test_verify_reports_values_beyond_fp16_rounding(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)
    good = verify_store(LogitStore.open(tmp_path / "s"), teacher, dataset, samples=1000)
    largest = float(np.abs(LogitStore.open(tmp_path / "s").records(0, np.arange(96))["value"]).max())
    assert good["records"] == 96 and good["ok"] and good["index_mismatch_tolerance"] == 0.01
    assert good["value_tolerance"] == pytest.approx(2.0**-10 * largest)  # twice fp16 rounding of the largest
    assert 0 < good["max_value_error"] <= 2.0**-11 * largest * 1.01  # fp16 rounding, nothing more
    edit_a_value_keeping_the_checksum(tmp_path / "s", position=7, delta=0.5 * largest)
    edited = verify_store(LogitStore.open(tmp_path / "s"), teacher, dataset, samples=1000)
    assert not edited["ok"] and edited["max_value_error"] == pytest.approx(0.5 * largest, rel=1e-2)
    with pytest.raises(ValueError, match="samples=0 must be >= 1"):
        verify_store(LogitStore.open(tmp_path / "s"), teacher, dataset, samples=0)


def test_verify_tolerance_follows_the_compute_precision():
    fp32, bf16 = VerifyTolerance.for_device("cpu"), VerifyTolerance.for_device("cuda")
    assert fp32.value_bound(8.0) == 8 * 2.0**-10 and fp32.value_bound(0.1) == 2.0**-10  # at least |logit| 1
    assert bf16.value_bound(8.0) == 8 * 2.0**-6  # bf16 autocast on CUDA: a few bf16 units


def test_describe_store_reads_the_manifest_and_checks_every_file(tmp_path):
    teacher, dataset = tiny_teacher(), data(augment=LIGHT)
    precompute(
        teacher,
        dataset,
        tmp_path / "s",
        k=3,
        mode="replay",
        epochs=2,
        batch_size=32,
        teacher_name="tiny",
        progress=False,
    )
    info = describe_store(tmp_path / "s")
    assert (info["mode"], info["k"], info["epochs"], info["images"], info["records"]) == ("replay", 3, 2, 96, 192)
    assert info["teacher"]["name"] == "tiny" and info["dataset"] == dataset.fingerprint()
    assert info["bytes_per_record"] == 24 and info["official_bytes_per_record"] == 16
    assert info["layout"] == "seed int64, rest float32, index int16 x 3, value float16 x 3"
    assert [(f["name"], f["bytes"], f["problem"]) for f in info["files"]] == [
        ("epoch-0000.bin", 96 * 24, None),
        ("epoch-0001.bin", 96 * 24, None),
    ]
    assert info["ok"]
    records = tmp_path / "s" / "epoch-0001.bin"
    records.write_bytes(records.read_bytes()[:-24])
    info = describe_store(tmp_path / "s")
    assert not info["ok"] and info["files"][0]["problem"] is None and "truncated" in info["files"][1]["problem"]
    with pytest.raises(FileNotFoundError, match="no logit store"):
        describe_store(tmp_path / "none")
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        describe_store(tmp_path / "s")


# ----------------------------------------------------------------------------- reliability (issue 12)


def test_a_second_precompute_on_the_same_path_is_refused_while_the_first_writes(tmp_path):
    """Two writers on one part used to interleave their batches; now the second is refused at once,
    writes nothing, and the first finishes a store identical to an undisturbed run's."""
    release = tmp_path / "release"
    reference = subprocess.Popen([sys.executable, str(_script(tmp_path, tmp_path / "ref", "ref.py"))], env=_env())
    hold = (
        f"from tests.test_logit_store import wait_after_each_batch_until; wait_after_each_batch_until({str(release)!r})"
    )
    first = subprocess.Popen([sys.executable, str(_script(tmp_path, tmp_path / "run", "first.py", hold))], env=_env())
    try:
        part = tmp_path / "run" / "epoch-0000.part-000"
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (part.exists() and part.stat().st_size > 0):
            time.sleep(0.01)
        second_script = _script(tmp_path, tmp_path / "run", "second.py")
        second = subprocess.run(
            [sys.executable, str(second_script)], env=_env(), capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None, "the first precompute stopped before the second started"
    finally:
        release.touch()  # the first goes on (and ends) whatever happened
    holder = f"process {first.pid} on host {socket.gethostname()}"
    assert second.returncode != 0 and f"LockHeld: logit store {tmp_path / 'run'} is in use by {holder}" in second.stderr
    assert first.wait(timeout=300) == 0 and reference.wait(timeout=300) == 0
    assert _store_bytes(tmp_path / "run") == _store_bytes(tmp_path / "ref")  # every record once, in order
    with pytest.raises(FileExistsError, match="already holds a complete logit store"):  # and once more
        precompute(tiny_teacher(), data(augment=LIGHT, n=256), tmp_path / "run", k=4, mode="replay", epochs=2)
    assert _store_bytes(tmp_path / "run") == _store_bytes(tmp_path / "ref")  # no lock file left behind


def test_a_resume_keeps_only_batches_whose_records_are_their_samples_views(tmp_path):
    """A replay part holding batches 0, 0, 1 (what two writers on one part left behind): `finish`
    refuses it, a resume keeps batch 0, computes the rest again and ends byte-identical."""
    teacher, dataset = tiny_teacher(), data(augment=LIGHT)
    replay = dict(k=4, mode="replay", epochs=2, batch_size=32, progress=False)
    reference, _ = precompute(teacher, dataset, tmp_path / "ref", **replay)
    with StoreWriter(tmp_path / "run", reference.header, batch_size=32, seeds=dataset_seeds(dataset)) as writer:
        for batch in (0, 0, 1):
            writer.append(0, reference.records(0, np.arange(32 * batch, 32 * batch + 32)))
        with pytest.raises(ValueError, match=r"position 32 in epoch 0 carries seed \d+, expected \d+: not the view"):
            writer.finish()
    assert not (tmp_path / "run" / "manifest.json").exists()
    with pytest.warns(UserWarning, match=r"position 32 in epoch 0 carries seed .* keeping the 1 batch\(es\) before it"):
        _, stats = precompute(teacher, dataset, tmp_path / "run", **replay)
    assert stats.images == 2 * 96 - 32
    assert _store_bytes(tmp_path / "run") == _store_bytes(tmp_path / "ref")


def test_a_static_part_with_a_seed_or_a_class_index_out_of_place_is_not_assembled(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    reference, _ = precompute(teacher, dataset, tmp_path / "ref", k=4, batch_size=32, progress=False)
    good = reference.records(0, np.arange(96))
    part = tmp_path / "run" / "epoch-0000.part-000"
    with StoreWriter(tmp_path / "run", reference.header, batch_size=32) as writer:
        for field, position, value, message in (
            ("seed", 40, 7, "position 40 in epoch 0 carries seed 7, expected -1"),
            ("index", 75, 10, r"position 75 in epoch 0 holds a class index outside \[0, 10\)"),
        ):
            bad = good.copy()
            bad[field][position] = value
            part.write_bytes(bad.tobytes())
            with pytest.raises(ValueError, match=message):
                writer.finish()
    with pytest.warns(UserWarning, match=r"position 75 .* keeping the 2 batch\(es\)"):
        precompute(teacher, dataset, tmp_path / "run", k=4, batch_size=32, progress=False)
    assert _store_bytes(tmp_path / "run") == _store_bytes(tmp_path / "ref")


def test_verify_finds_duplicated_records_that_every_checksum_accepts(tmp_path):
    teacher, dataset = tiny_teacher(), data()
    precompute(teacher, dataset, tmp_path / "s", k=4, batch_size=32, progress=False)

    def duplicate_the_first_batch(records: np.ndarray) -> None:
        records[32:64] = records[0:32]

    rewrite_records_keeping_the_checksums(tmp_path / "s", duplicate_the_first_batch)
    report = verify_store(LogitStore.open(tmp_path / "s"), teacher, dataset, samples=1000)
    assert not report["ok"] and report["index_mismatch_rate"] > 0.2


def test_every_single_bit_flip_of_the_manifest_is_refused_in_one_line(tmp_path):
    path = tmp_path / "s"
    precompute(tiny_teacher(), data(n=8), path, k=3, batch_size=8, progress=False)
    original = (path / "manifest.json").read_bytes()
    store = LogitStore.open(path)
    expected = (store.header, store.records(0, np.arange(8)).tobytes())
    refused = 0
    for bit in range(8 * len(original)):
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        (path / "manifest.json").write_bytes(bytes(flipped))
        try:
            opened = LogitStore.open(path)
        except Exception as exc:  # which exceptions come out is what is tested
            assert type(exc) in (ValueError, StoreMismatch, FileNotFoundError), (bit, type(exc), exc)
            assert len(str(exc).splitlines()) == 1, (bit, str(exc))
            refused += 1
        else:
            assert (opened.header, opened.records(0, np.arange(8)).tobytes()) == expected, bit
    assert refused == 8 * len(original)  # no single flipped bit leaves a manifest that opens


def test_manifest_fields_are_checked_by_name_and_an_unsealed_manifest_is_refused(tmp_path):
    path = tmp_path / "s"
    store, _ = precompute(tiny_teacher(), data(), path, k=4, batch_size=32, progress=False)
    written = json.loads((path / "manifest.json").read_text())

    def write(edit: Callable[[dict], None], *, seal: bool) -> None:
        manifest = json.loads(json.dumps(written))
        del manifest["manifest_sha256"]
        edit(manifest)
        if seal:  # as a tool that re-seals what it edits would
            manifest["manifest_sha256"] = manifest_digest(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))

    write(lambda m: None, seal=False)  # as written before manifest_sha256 existed
    with pytest.raises(StoreMismatch, match="has no manifest_sha256: the store was written by an older version"):
        LogitStore.open(path)
    cases = [
        (
            lambda m: m["header"].update(num_classes=11),
            "header num_classes=11 differs from the dataset's num_classes 10",
        ),
        (
            lambda m: m["header"].update(k=5),
            "record bytes 28 do not fit the header: k=5 of num_classes=10 make records of 32",
        ),
        (lambda m: m["header"].update(k="4"), "header k must be of type int, got '4'"),
        (lambda m: m["header"].update(epochs=True), "header epochs must be of type int, got True"),
        (
            lambda m: m["header"]["dataset"].update(size=95),
            "files[0] must be {'name': 'epoch-0000.bin', 'epoch': 0, 'records': 95}",
        ),
        (lambda m: m["header"].pop("mode"), "header: missing field(s) ['mode'], unknown field(s) []"),
        (lambda m: m["files"][0].update(name="../other.bin"), "files[0] must be"),
        (lambda m: m["files"].append(m["files"][0]), "'files' must list 1 record file(s), one per epoch"),
        (
            lambda m: m.update(version="1"),
            "is not a tinyvit-logit-store v1, v2 or v3 store (format='tinyvit-logit-store', version='1')",
        ),
        (lambda m: m.update(extra=1), "missing field(s) [], unknown field(s) ['extra']"),
        (lambda m: m.update(record=[28]), "'record' must hold bytes and layout, got [28]"),
        (lambda m: m["header"].update(data="synthetic"), "header data must be of type dict | None, got 'synthetic'"),
        (
            lambda m: m["header"].update(data={"augment": ["light"]}),
            "header data must map names to JSON scalars, got {'augment': ['light']}",
        ),
        (lambda m: m["header"].pop("data"), "header: missing field(s) ['data'], unknown field(s) []"),
        (lambda m: m["header"].update(base_seed=0), "header: missing field(s) [], unknown field(s) ['base_seed']"),
    ]
    for edit, message in cases:
        for seal in (True, False):
            write(edit, seal=seal)
            with pytest.raises(ValueError, match=re.escape(message)):
                LogitStore.open(path)
    write(lambda m: m["header"]["teacher"].update(name="another"), seal=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["manifest_sha256"] = written["manifest_sha256"]  # a valid edit under the original seal
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="was changed after it was written: its manifest_sha256 does not match"):
        LogitStore.open(path)


def test_a_replay_store_of_fewer_epochs_than_the_run_trains_is_refused_on_open(tmp_path):
    teacher, augmented = tiny_teacher(), data(augment=LIGHT)
    precompute(teacher, augmented, tmp_path / "replay", k=4, mode="replay", epochs=2, batch_size=32, progress=False)
    with pytest.raises(StoreMismatch, match=r"the replay store holds 2 epoch\(s\) of views, the run trains 3"):
        StoredTeacher.open(tmp_path / "replay", augmented, epochs=3)
    assert StoredTeacher.open(tmp_path / "replay", augmented, epochs=2).store.header.epochs == 2
    assert StoredTeacher.open(tmp_path / "replay", augmented).store.header.epochs == 2  # default: not checked
    precompute(teacher, data(), tmp_path / "static", k=4, batch_size=32, progress=False)
    assert StoredTeacher.open(tmp_path / "static", data(), epochs=100).store.header.mode == "static"


def test_no_store_is_told_apart_as_missing_a_file_an_empty_folder_or_an_unfinished_precompute(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "pending.json").write_text("{}")
    cases = {
        "missing": "",
        "file": " (it is a file, not a store folder)",
        "empty": " (the folder is empty)",
        "other": " (the folder holds 1 other file(s), such as ['notes.txt'], and no manifest.json)",
        "pending": " (an unfinished precompute: run it again to complete it)",
    }
    for name, why in cases.items():
        with pytest.raises(FileNotFoundError) as refused:
            LogitStore.open(tmp_path / name)
        assert str(refused.value) == f"no logit store at {tmp_path / name}{why}"


def test_an_output_path_that_cannot_be_written_is_refused_naming_the_reason(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "file": "it is a file, not a folder",
        tmp_path / "file" / "store": "Not a directory",
        Path("/proc/version/store"): "Not a directory",  # refused to root too
    }
    for path, reason in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"cannot write a logit store at {path}: {reason}")):
            precompute(tiny_teacher(), data(), path, k=4, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------------- the data spec in the header

SPEC = dict(
    dataset="synthetic", img_size=32, augment="light", mix=None, max_per_class=None, val_per_class=2, data_seed=3
)


def small_header(**changes) -> StoreHeader:
    """A static header of 8 samples of 10 classes, k=3 (no teacher needed to write its store)."""
    fields = dict(
        teacher=dict(name="t"),
        dataset=dict(name="synthetic", size=8, num_classes=10),
        img_size=32,
        transform="eval",
        mode="static",
        k=3,
        num_classes=10,
        epochs=1,
        data_seed=3,
    )
    return StoreHeader(**{**fields, **changes})


def write_small_store(path: Path, header: StoreHeader) -> LogitStore:
    """The store of `header` (`small_header`) with records of made-up logits."""
    logits = torch.arange(8 * 10, dtype=torch.float32).view(8, 10).remainder(7)
    with StoreWriter(path, header, batch_size=4) as writer:
        for batch in writer.todo(0):
            positions = list(writer.positions(batch))
            writer.append(0, encode_records(logits[positions], [-1] * len(positions), header.k))
        return writer.finish()


def test_a_header_records_the_data_spec_it_was_written_from(tmp_path):
    header = small_header(data=SPEC)
    store = write_small_store(tmp_path / "s", header)
    assert LogitStore.open(tmp_path / "s").header == header == store.header
    written = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert written["version"] == 3 and written["header"]["data"] == SPEC
    assert written["header"]["data_seed"] == 3 and "base_seed" not in written["header"]
    info = describe_store(tmp_path / "s")
    assert info["data"] == SPEC and info["data_seed"] == 3 and info["version"] == 3
    other = small_header(data=dict(SPEC, augment="none"))
    assert header.differences(other) == [f"data: store {SPEC!r}, asked {dict(SPEC, augment='none')!r}"]
    assert header.differences(small_header()) == [f"data: store {SPEC!r}, asked None"]
    with pytest.raises(StoreMismatch, match="made for something else: data: store"):
        LogitStore.open(tmp_path / "s", expect=other)
    for data, message in (
        ([1], "data must be of type dict | None, got [1]"),
        ({"mix": ("full",)}, "data must map names to JSON scalars, got {'mix': ('full',)}"),
        ({1: "synthetic"}, "data must map names to JSON scalars"),
        ({"img_size": float("nan")}, "data must map names to JSON scalars"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            small_header(data=data)


def as_older_version(path: Path, version: int) -> None:
    """Rewrite the manifest of the store at `path` as `version` (1 or 2) wrote it: the header's
    `data_seed` called `base_seed`, no `data` (and in version 1 no `mix`), sealed again."""
    manifest = json.loads((path / "manifest.json").read_text())
    dropped = ("data", "data_seed", "mix") if version == 1 else ("data", "data_seed")
    header = {key: value for key, value in manifest["header"].items() if key not in dropped}
    manifest = dict(manifest, version=version, header=dict(header, base_seed=manifest["header"]["data_seed"]))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_store_opens_with_base_seed_read_as_data_seed_and_no_data_spec(tmp_path, version):
    write_small_store(tmp_path / "s", small_header(data=SPEC))
    records = LogitStore.open(tmp_path / "s").records(0, np.arange(8)).tobytes()
    as_older_version(tmp_path / "s", version)
    store = LogitStore.open(tmp_path / "s")
    assert store.header == small_header() and store.header.data_seed == 3 and store.header.data is None
    assert store.records(0, np.arange(8)).tobytes() == records
    info = describe_store(tmp_path / "s")
    assert info["version"] == version and info["data_seed"] == 3 and info["data"] is None and info["mix"] == {}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for header, message in (
        (dict(manifest["header"], data=SPEC), "unknown field(s) ['data']"),  # no data spec before version 3
        ({**manifest["header"], "data_seed": 3}, "unknown field(s) ['data_seed']"),
    ):
        edited = dict(manifest, header=header)
        edited["manifest_sha256"] = manifest_digest(edited)
        (tmp_path / "s" / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=re.escape(message)):
            LogitStore.open(tmp_path / "s")
