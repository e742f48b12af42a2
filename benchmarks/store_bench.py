"""The logit store at the paper's scale, simulated (`make bench`, section "store").

TinyViT distils over ImageNet-21k: about 13.2M images per epoch, 21,841 classes. This section
writes one epoch of that many synthetic records at k = 10 (52 bytes each, about 0.69 GB) through the
library's own `StoreWriter` (the part files, the record check, the checksum, the manifest), then:

  * times the write with one process and sharded over several (`world_size` ranks in separate
    processes, each appending its part; rank 0 seals the store), in MB/s and records/s;
  * reads records in training order (a random permutation, in batches of 128, through
    `LogitStore.records`, as `distill.StoredTeacher` does) with the file's pages dropped from the
    page cache first (cold: `posix_fadvise(DONTNEED)`, which needs no privileges; the share of the
    file still cached is measured with `mincore`) and after one sequential pass over it (warm), in
    records/s for one process. On a virtual machine "cold" means cold in the guest: the host may
    still cache the disk;
  * compares the read rate with what training can consume: the paper's TinyViT-5M throughput,
    3,060 images/s per V100, so about 25,000 records/s for 8 GPUs.

The records are random (indices, values, the remainder) but valid: each carries its view's seed,
so the writer's check passes. `--quick` writes 132,000 records. Nothing here fails on a slow disk.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from tinyvit_lib.logit_store import LogitStore, StoreHeader, StoreWriter, epoch_file

PAPER_RECORDS = 13_200_000  # ImageNet-21k images per epoch (Cream's stored logits)
QUICK_RECORDS = 132_000
NUM_CLASSES = 21_841
K = 10
WRITE_BATCH = 8192  # records per append (each append is fsync'ed, as in a precompute)
READ_BATCH = 128
TRAINING_RATE = 8 * 3060  # records/s: 8 V100s at the paper's TinyViT-5M throughput


def _seeds(epoch: int, positions: np.ndarray) -> np.ndarray:
    """The (synthetic) seed of each position's view: any fixed int64 per position will do."""
    return np.asarray(positions, dtype=np.int64) * 2 + 1 + epoch


def _header(size: int) -> StoreHeader:
    return StoreHeader(
        teacher=dict(name="synthetic", description="random records", weights_sha256=""),
        dataset=dict(name="synthetic-imagenet-21k", split="train", size=size, num_classes=NUM_CLASSES),
        img_size=224,
        transform="synthetic",
        mode="replay",
        k=K,
        num_classes=NUM_CLASSES,
        epochs=1,
        data_seed=0,
    )


def synthetic_records(header: StoreHeader, positions: range, rng: np.random.Generator) -> np.ndarray:
    """Valid records for `positions`: the view's seed, k distinct-looking class indices, descending
    fp16 logits and a remainder below them."""
    out = np.empty(len(positions), dtype=header.dtype)
    out["seed"] = _seeds(0, np.arange(positions.start, positions.stop))
    out["index"] = rng.integers(0, NUM_CLASSES, size=(len(positions), K), dtype=np.int16)
    out["value"] = -np.sort(-rng.standard_normal((len(positions), K)).astype(np.float16), axis=1)
    out["rest"] = out["value"][:, -1].astype(np.float32) - 4.0
    return out


def _write_rank(path: str, size: int, rank: int, world_size: int) -> None:
    """One rank's part of the store (in its own process when sharded)."""
    header = _header(size)
    rng = np.random.default_rng(rank)
    with StoreWriter(path, header, batch_size=WRITE_BATCH, rank=rank, world_size=world_size, seeds=_seeds) as w:
        for batch in w.todo(0):
            w.append(0, synthetic_records(header, w.positions(batch), rng))


def write_store(path: Path, size: int, world_size: int) -> float:
    """Write and seal a store of `size` records with `world_size` processes; seconds taken."""
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    if world_size == 1:
        _write_rank(str(path), size, 0, 1)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_write_rank, args=(str(path), size, r, world_size)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a writer rank exited with status {p.exitcode}")
    StoreWriter(path, _header(size), batch_size=WRITE_BATCH, world_size=world_size, seeds=_seeds).finish()
    return time.perf_counter() - started


def drop_from_page_cache(file: Path) -> None:
    """Ask the kernel to forget `file`'s cached pages (clean pages go; no privileges needed)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(file: Path) -> float | None:
    """The fraction of `file`'s pages in this machine's page cache (Linux `mincore`); None where it
    cannot tell."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    size, page = file.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    pages = ctypes.create_string_buffer((size + page - 1) // page)
    fd = os.open(file, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            if libc.mincore(address, size, pages) != 0:
                return None
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return float((np.frombuffer(pages.raw, dtype=np.uint8) & 1).mean())


def read_rate(store: LogitStore, order: np.ndarray, batches: int) -> dict:
    """Records/s reading the first `batches` batches of `order` (batch after batch, as training does)."""
    times = []
    for b in range(min(batches, len(order) // READ_BATCH)):
        positions = order[b * READ_BATCH : (b + 1) * READ_BATCH]
        t0 = time.perf_counter()
        store.records(0, positions)
        times.append(time.perf_counter() - t0)
    return dict(
        records_per_s=READ_BATCH * len(times) / sum(times),
        median_batch_ms=1000 * statistics.median(times),
        batches=len(times),
    )


def _advise_random(store: LogitStore) -> bool:
    """Advise the kernel that epoch 0's mapping is read at random (no read-ahead); False where it cannot."""
    mapping = getattr(store._maps[0], "_mmap", None)  # numpy.memmap's own mmap object
    if mapping is None or not hasattr(mmap, "MADV_RANDOM"):
        return False
    mapping.madvise(mmap.MADV_RANDOM)
    return True


def _print_read(name: str, r: dict) -> None:
    share = "/".join("?" if f is None else f"{f:.0%}" for f in (r["resident_before"], r["resident_after"]))
    print(
        f"  {name.replace('_', ' ')} ({share} of the file in the page cache before/after): "
        f"{r['records_per_s']:,.0f} records/s per process ({r['batches']} batches of {READ_BATCH}, median "
        f"{r['median_batch_ms']:.2f} ms), {r['records_per_s'] / TRAINING_RATE:.1f}x what 8 V100s consume "
        f"({TRAINING_RATE:,}/s)"
    )


def disk_description(path: Path) -> str:
    """The file system and device under `path`, as `df` reports them."""
    try:
        out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True, check=True).stdout
        return " ".join(out.splitlines()[-1].split()[:3])  # device, type, size
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def store_section(root: Path, *, quick: bool, processes: int = 2) -> dict:
    """Write (1 and `processes` processes), read (cold, warm) and print one epoch at the paper's scale."""
    size = QUICK_RECORDS if quick else PAPER_RECORDS
    header = _header(size)
    mb = size * header.dtype.itemsize / 1e6
    print(
        f"logit store at the paper's scale: {size:,} records of {header.dtype.itemsize} bytes (k = {K}, "
        f"{NUM_CLASSES:,} classes), {mb:,.0f} MB, on {disk_description(root)}"
    )
    result: dict = dict(records=size, bytes_per_record=header.dtype.itemsize, disk=disk_description(root))
    for world in (1, processes):
        seconds = write_store(root / "store", size, world)
        result[f"write_{world}_processes"] = dict(seconds=seconds, mb_per_s=mb / seconds, records_per_s=size / seconds)
        rate = f"{mb / seconds:.0f} MB/s, {size / seconds:,.0f} records/s"
        print(f"  write, {world} process(es): {seconds:.1f} s, {rate}")
    file = root / "store" / epoch_file(0)
    order = np.random.default_rng(0).permutation(size)
    # Cold, twice: with the kernel's read-ahead (each page fault reads a block around it, so a random
    # pass pulls the whole file in within its first batches: the rate depends on how many batches are
    # timed, and the share resident after the read says how much came in), and with the mapping
    # advised MADV_RANDOM (one page per fault: what a file larger than memory costs per record).
    # Warm: the file in the page cache. The share in the page cache is reported before and after.
    for name, batches in (("read_cold", 200), ("read_cold_random_advice", 200), ("read_warm", 2000)):
        store = None  # unmapped first: pages a process still maps stay in the page cache
        drop_from_page_cache(file)
        store = LogitStore.open(root / "store", verify=False)
        if name == "read_cold_random_advice" and not _advise_random(store):
            continue
        if name == "read_warm":
            with open(file, "rb") as f:  # one sequential pass: the file in the page cache
                while f.read(1 << 24):
                    pass
        before = resident_fraction(file)
        result[name] = dict(read_rate(store, order[::-1].copy() if name == "read_warm" else order, batches))
        result[name].update(resident_before=before, resident_after=resident_fraction(file))
        _print_read(name, result[name])
    del store
    shutil.rmtree(root / "store", ignore_errors=True)
    return result
