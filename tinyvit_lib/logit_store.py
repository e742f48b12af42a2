"""The sparse logit store: a teacher's top-k logits on disk, written once, read by every student run.

A store is a folder:

    manifest.json        what the records are and what made them (written last: no manifest, no store)
    epoch-0000.bin       fixed-size records, one per sample, in the dataset's sample order
    epoch-0001.bin       ... (replay mode: one file per epoch; static mode: one file)

One record (little-endian, packed; `record_dtype(k, num_classes)`):

    seed   int64        the augmentation seed of the view the teacher saw (-1 in static mode)
    rest   float32      log of the mean exp(logit) over the classes outside the top k (-inf if none)
    index  int16 x k    top-k class indices, largest logit first (int32 past 32,767 classes)
    value  float16 x k  their logits

That is 12 + 4k bytes, 8 more than the official 4 + 4k (a 64-bit seed and the remainder term).
Storing logits plus the remainder rebuilds the teacher's distribution at any temperature: the
top k keep their logits, every other class gets `rest` (the remainder spread uniformly, as the
official implementation does), exact at T = 1 in total mass and exact everywhere when k equals the
class count.

Reads go through `numpy.memmap`: a lookup by sample position is one slice, O(1). Writing is
append-only in whole batches (`StoreWriter`), so an interrupted precompute resumes by truncating
to the last complete batch; per-rank part files make sharded writes concatenate into exactly the
single-process file. This module knows records, not models or datasets: it receives their
descriptions as values and compares them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .utils import atomic_write, atomic_write_text

__all__ = [
    "FORMAT",
    "VERSION",
    "record_dtype",
    "record_layout",
    "official_record_bytes",
    "StoreHeader",
    "LogitStore",
    "StoreWriter",
    "encode_records",
    "rebuild_logits",
    "StoreMismatch",
    "derive_smaller_k",
    "describe_store",
]

FORMAT = "tinyvit-logit-store"
VERSION = 1
MANIFEST = "manifest.json"


class StoreMismatch(ValueError):
    """A store that exists but was made for something else (teacher, data, resolution, k)."""


def record_dtype(k: int, num_classes: int) -> np.dtype:
    """The packed record layout for top-k of `num_classes` (see the module docstring)."""
    index = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    return np.dtype([("seed", "<i8"), ("rest", "<f4"), ("index", index, (k,)), ("value", "<f2", (k,))])


def official_record_bytes(k: int) -> int:
    """Bytes per record in the official TinyViT format for top-k: a 32-bit seed, k fp16 values and
    k int16 indices (4 + 4k; ours adds a 64-bit seed and the remainder term)."""
    return 4 + 4 * k


def record_layout(dtype: np.dtype) -> str:
    """A record layout in words, e.g. 'seed int64, rest float32, index int16 x 10, value float16 x 10'."""
    fields = []
    for name in dtype.names:
        field = dtype.fields[name][0]
        base, shape = field.subdtype if field.subdtype else (field, ())
        fields.append(f"{name} {base.name}" + (f" x {int(np.prod(shape))}" if shape else ""))
    return ", ".join(fields)


@dataclass(frozen=True)
class StoreHeader:
    """Everything a store promises about its records; compared field by field on open.

    Raises:
        ValueError: a mode other than 'static'/'replay', k outside [1, num_classes], or epochs < 1
            (a static store holds exactly one epoch).
    """

    teacher: dict  # name, description, weights_sha256
    dataset: dict  # the dataset fingerprint (name, split, size, ID and content hashes)
    img_size: int
    transform: str  # the description of the view the teacher saw
    mode: str  # "static" or "replay"
    k: int
    num_classes: int
    epochs: int
    base_seed: int

    def __post_init__(self) -> None:
        if self.mode not in ("static", "replay"):
            raise ValueError(f"mode must be 'static' or 'replay', got {self.mode!r}")
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k={self.k} must be between 1 and the class count {self.num_classes}")
        if self.mode == "static" and self.epochs != 1:
            raise ValueError(
                f"epochs={self.epochs}: a static store holds one record per image (epochs=1); "
                "use mode 'replay' for several epochs of augmented views"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")

    @property
    def size(self) -> int:
        return int(self.dataset["size"])

    @property
    def dtype(self) -> np.dtype:
        return record_dtype(self.k, self.num_classes)

    def to_dict(self) -> dict:
        return dict(
            teacher=self.teacher,
            dataset=self.dataset,
            img_size=self.img_size,
            transform=self.transform,
            mode=self.mode,
            k=self.k,
            num_classes=self.num_classes,
            epochs=self.epochs,
            base_seed=self.base_seed,
        )

    def differences(self, other: StoreHeader) -> list[str]:
        """Human-readable differences, e.g. ["k: store 10, asked 5"]."""
        ours, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: store {ours[key]!r}, asked {theirs[key]!r}" for key in ours if ours[key] != theirs[key]]


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.bin"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- encode / decode


def encode_records(logits: torch.Tensor, seeds: torch.Tensor | list[int], k: int) -> np.ndarray:
    """Records for a batch of dense logits (B, C): top-k logits and indices, the remainder, the seeds."""
    logits = logits.detach().float().cpu()
    batch, num_classes = logits.shape
    values, indices = logits.topk(k, dim=1)  # (B, k), sorted, largest first
    if k < num_classes:
        lse_all = torch.logsumexp(logits.double(), dim=1)
        lse_top = torch.logsumexp(values.double(), dim=1)
        # log(sum over the other C - k classes of exp(z)) - log(C - k), computed without cancellation
        rest = lse_all + torch.log1p(-torch.exp(lse_top - lse_all).clamp(max=1.0)) - math.log(num_classes - k)
    else:
        rest = torch.full((batch,), -math.inf, dtype=torch.float64)
    out = np.empty(batch, dtype=record_dtype(k, num_classes))
    out["seed"] = np.asarray(seeds, dtype=np.int64)
    out["rest"] = rest.float().numpy()
    out["index"] = indices.numpy()
    out["value"] = values.half().numpy()
    return out


def rebuild_logits(records: np.ndarray, num_classes: int) -> torch.Tensor:
    """Dense logits (B, C) from records: the top k as stored, every other class at `rest`.

    softmax(rebuild_logits(r) / T) is the teacher's distribution at temperature T with the mass
    outside the top k spread uniformly (exactly the teacher's at T = 1 in total, and exactly the
    teacher's everywhere when k = C, up to fp16 rounding of the values).
    """
    rest = torch.from_numpy(np.ascontiguousarray(records["rest"])).float()  # (B,)
    logits = rest[:, None].expand(-1, num_classes).clone()  # (B, C)
    index = torch.from_numpy(np.ascontiguousarray(records["index"])).long()  # (B, k)
    value = torch.from_numpy(np.ascontiguousarray(records["value"])).float()  # (B, k)
    return logits.scatter_(1, index, value)


# ----------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> tuple[dict, StoreHeader]:
    """The manifest of the store at `path` and its header.

    Raises:
        FileNotFoundError: no manifest (no store, or an unfinished precompute).
        ValueError: a manifest that is not JSON, not of this format/version, or malformed.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        partial = " (an unfinished precompute: run it again to complete it)" if path.is_dir() else ""
        raise FileNotFoundError(f"no logit store at {path}{partial}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise ValueError(
            f"{path} is not a {FORMAT} v{VERSION} store "
            f"(format={found.get('format')!r}, version={found.get('version')!r})"
        )
    try:
        header = StoreHeader(**manifest["header"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{manifest_path} is malformed: {type(exc).__name__}: {exc}") from exc
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and {"name", "sha256"} <= f.keys() for f in files):
        raise ValueError(f"{manifest_path} is malformed: 'files' must list the record files with name and sha256")
    return manifest, header


def _file_problem(path: Path, entry: dict, header: StoreHeader, *, verify: bool) -> str | None:
    """What is wrong with the record file a manifest `entry` names (None: nothing): missing, of the
    wrong size, or (with `verify`) not matching its checksum."""
    file_path = path / entry["name"]
    expected_bytes = header.size * header.dtype.itemsize
    if not file_path.is_file():
        return f"logit store file missing: {file_path}"
    if file_path.stat().st_size != expected_bytes:
        return (
            f"{file_path} has {file_path.stat().st_size} bytes, expected {expected_bytes} "
            f"({header.size} records of {header.dtype.itemsize}): truncated or corrupted"
        )
    if verify and _sha256(file_path) != entry["sha256"]:
        return f"{file_path}: checksum mismatch, the file is corrupted"
    return None


class LogitStore:
    """A complete store, opened read-only. `records(epoch, positions)` is an O(1) memory-map slice.

    Raises (from `open`):
        FileNotFoundError: no store at the path, or an incomplete one (no manifest yet).
        ValueError: not a store of this format/version, a file of the wrong size, or a checksum
            that does not match (a truncated or corrupted file).
        StoreMismatch: `expect` given and the store was made for something else.
    """

    def __init__(self, path: Path, header: StoreHeader, files: list[dict]) -> None:
        self.path, self.header = path, header
        self._maps = [np.memmap(path / f["name"], dtype=header.dtype, mode="r", shape=(header.size,)) for f in files]

    @classmethod
    def open(cls, path: str | Path, *, expect: StoreHeader | None = None, verify: bool = True) -> LogitStore:
        path = Path(path)
        manifest, header = _read_manifest(path)
        if expect is not None:
            diffs = header.differences(expect)
            if diffs:
                raise StoreMismatch(f"logit store {path} was made for something else: " + "; ".join(diffs))
        for entry in manifest["files"]:
            problem = _file_problem(path, entry, header, verify=verify)
            if problem:
                raise ValueError(problem)
        return cls(path, header, manifest["files"])

    @property
    def bytes_per_record(self) -> int:
        return self.header.dtype.itemsize

    def records(self, epoch: int, positions: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        """The records of the samples at `positions` (dataset order) for `epoch` (ignored if static).

        Raises:
            ValueError: a replay store asked for an epoch it does not hold.
            IndexError: a position outside the store, named in the message.
        """
        if self.header.mode == "static":
            epoch = 0
        elif not 0 <= epoch < self.header.epochs:
            raise ValueError(
                f"replay store {self.path} holds epochs 0..{self.header.epochs - 1}, asked {epoch}: "
                f"precompute at least as many epochs as you train"
            )
        positions = np.asarray(positions, dtype=np.int64)
        bad = positions[(positions < 0) | (positions >= self.header.size)]
        if bad.size:
            raise IndexError(
                f"sample id(s) {bad[:5].tolist()} not in logit store {self.path} ({self.header.size} samples)"
            )
        return np.asarray(self._maps[epoch][positions])

    def logits(self, epoch: int, positions) -> torch.Tensor:
        """Rebuilt dense logits (B, C) for the samples at `positions` (see `rebuild_logits`)."""
        return rebuild_logits(self.records(epoch, positions), self.header.num_classes)


# ----------------------------------------------------------------------------- writing


class StoreWriter:
    """Writes one store, resumably, in whole batches; one writer per rank when sharded.

    Batches are numbered over the dataset in order (batch b holds positions [b*B, (b+1)*B)); rank r
    of `world_size` owns a contiguous run of batches and appends their records to its part file
    `epoch-XXXX.part-RRR` (the same batch composition as one process, so the same bytes). Run again
    after a kill, a writer keeps the complete batches already on disk and reports which to compute
    next. `finish()` (rank 0, after every rank is done) concatenates the parts, checksums the files
    and writes the manifest last.
    """

    def __init__(
        self, path: str | Path, header: StoreHeader, *, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.path, self.header, self.batch_size = Path(path), header, batch_size
        self.rank, self.world_size = rank, world_size
        self.path.mkdir(parents=True, exist_ok=True)
        pending = self.path / "pending.json"
        wanted = dict(header=header.to_dict(), batch_size=batch_size, world_size=world_size)
        if (self.path / MANIFEST).exists():
            raise FileExistsError(f"{self.path} already holds a complete logit store; remove it or choose another path")
        if pending.exists():
            found = json.loads(pending.read_text())
            if found != wanted:
                diffs = [k for k in wanted if found.get(k) != wanted[k]]
                raise StoreMismatch(
                    f"{self.path} holds an unfinished precompute with other settings ({diffs}); "
                    "remove it or finish it with the same settings"
                )
        elif rank == 0:
            atomic_write_text(pending, json.dumps(wanted, indent=2))
        num_batches = math.ceil(header.size / batch_size)
        share = math.ceil(num_batches / world_size)
        self.batches = range(min(rank * share, num_batches), min((rank + 1) * share, num_batches))

    def _part(self, epoch: int, rank: int) -> Path:
        return self.path / f"epoch-{epoch:04d}.part-{rank:03d}"

    def _batch_len(self, batch: int) -> int:
        return min(self.batch_size, self.header.size - batch * self.batch_size)

    def todo(self, epoch: int) -> range:
        """This rank's batches of `epoch` still to compute (truncating a half-written batch)."""
        if (self.path / epoch_file(epoch)).exists():
            return range(0)
        part = self._part(epoch, self.rank)
        itemsize = self.header.dtype.itemsize
        have = part.stat().st_size // itemsize if part.exists() else 0
        done = 0
        for batch in self.batches:  # whole batches only
            if have >= self._batch_len(batch):
                have -= self._batch_len(batch)
                done += 1
            else:
                break
        kept = sum(self._batch_len(b) for b in self.batches[:done]) * itemsize
        if part.exists() and part.stat().st_size != kept:
            with open(part, "r+b") as f:
                f.truncate(kept)
        return self.batches[done:]

    def positions(self, batch: int) -> range:
        start = batch * self.batch_size
        return range(start, start + self._batch_len(batch))

    def append(self, epoch: int, records: np.ndarray) -> None:
        """Append one batch's records (in position order) to this rank's part for `epoch`."""
        with open(self._part(epoch, self.rank), "ab") as f:
            f.write(records.astype(self.header.dtype, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> LogitStore:
        """Concatenate every rank's parts into the epoch files, checksum them, write the manifest.

        Raises:
            ValueError: a part is missing or short (a rank did not finish).
        """
        files = []
        expected = self.header.size * self.header.dtype.itemsize
        for epoch in range(self.header.epochs):
            final = self.path / epoch_file(epoch)
            if not final.exists():
                parts = [self._part(epoch, rank) for rank in range(self.world_size)]
                held = sum(part.stat().st_size for part in parts if part.exists())
                if held != expected:
                    raise ValueError(
                        f"epoch {epoch}: the parts hold {held} bytes, expected {expected}; "
                        "some rank did not finish: run the precompute again"
                    )
                data = b"".join(part.read_bytes() for part in parts if part.exists())
                atomic_write(final, lambda out, data=data: out.write(data))
            files.append(dict(name=final.name, epoch=epoch, records=self.header.size, sha256=_sha256(final)))
        manifest = dict(
            format=FORMAT,
            version=VERSION,
            header=self.header.to_dict(),
            record=dict(bytes=self.header.dtype.itemsize, layout=str(self.header.dtype.descr)),
            files=files,
        )
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        for epoch in range(self.header.epochs):
            for rank in range(self.world_size):
                self._part(epoch, rank).unlink(missing_ok=True)
        (self.path / "pending.json").unlink(missing_ok=True)
        return LogitStore.open(self.path, verify=False)


# ----------------------------------------------------------------------------- describing


def describe_store(path: str | Path) -> dict:
    """What the store at `path` holds, read from its manifest and files alone (no teacher, no data).

    Returns a dict: `path`, `format`, `version`, every `StoreHeader` field (teacher: name,
    parameters, weights_sha256; dataset: its fingerprint; img_size, transform, mode, k,
    num_classes, epochs, base_seed), `images` (records per epoch), `records` (in all),
    `bytes_per_record`, `official_bytes_per_record` (`official_record_bytes(k)`), `layout` (in
    words), `files` (one dict per record file: name, epoch, bytes on disk or None, sha256 from the
    manifest, and `problem`, None when the file is there, of the right size and matches its
    checksum) and `ok` (no file has a problem). Every file is read once to check its checksum.

    Raises:
        FileNotFoundError: no store at `path` (or an unfinished one).
        ValueError: a manifest that is not JSON, not of this format/version, or malformed.
    """
    path = Path(path)
    manifest, header = _read_manifest(path)
    files = []
    for entry in manifest["files"]:
        file_path = path / entry["name"]
        files.append(
            dict(
                name=entry["name"],
                epoch=entry.get("epoch"),
                bytes=file_path.stat().st_size if file_path.is_file() else None,
                sha256=entry["sha256"],
                problem=_file_problem(path, entry, header, verify=True),
            )
        )
    return dict(
        path=str(path),
        format=FORMAT,
        version=VERSION,
        **header.to_dict(),
        images=header.size,
        records=header.size * header.epochs,
        bytes_per_record=header.dtype.itemsize,
        official_bytes_per_record=official_record_bytes(header.k),
        layout=record_layout(header.dtype),
        files=files,
        ok=all(f["problem"] is None for f in files),
    )


# ----------------------------------------------------------------------------- deriving


def derive_smaller_k(store: LogitStore, k: int, path: str | Path) -> LogitStore:
    """A store with the top `k` < store.k of every record, derived without running the teacher.

    The records are sorted, so the top k are the first k entries; the remainder now also holds
    entries k+1..store.k, folded into `rest` (in float64, from the stored fp16 logits). Equal to a
    precompute at k up to that fp16 rounding. An existing complete store at `path` is reused.

    Raises:
        ValueError: k not in [1, store.k).
    """
    header = store.header
    if not 1 <= k < header.k:
        raise ValueError(f"k={k} must be between 1 and the store's k - 1 ({header.k - 1})")
    path = Path(path)
    if (path / MANIFEST).exists():
        return LogitStore.open(path)
    small = StoreHeader(**dict(header.to_dict(), k=k))
    writer = StoreWriter(path, small, batch_size=max(header.size, 1))
    for epoch in range(header.epochs):
        if not writer.todo(epoch):
            continue
        records = store.records(epoch, np.arange(header.size))
        values = records["value"].astype(np.float64)  # (N, k_old)
        others = header.num_classes - header.k
        tail = np.exp(values[:, k:])  # entries k+1..k_old move into the remainder
        rest_mass = (others * np.exp(records["rest"].astype(np.float64)) if others else 0.0) + tail.sum(axis=1)
        out = np.empty(header.size, dtype=small.dtype)
        out["seed"], out["index"] = records["seed"], records["index"][:, :k]
        out["value"] = records["value"][:, :k]
        out["rest"] = np.log(rest_mass / (header.num_classes - k)).astype(np.float32)
        writer.append(epoch, out)
    return writer.finish()
