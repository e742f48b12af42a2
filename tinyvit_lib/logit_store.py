"""The sparse logit store: a teacher's top-k logits on disk, written once, read by every student run.

A store is a folder:

    manifest.json        what the records are and what made them (written last: no manifest, no store)
    epoch-0000.bin       fixed-size records, one per sample, in the dataset's sample order
    epoch-0001.bin       ... (replay mode: one file per epoch; static mode: one file)

One record (little-endian, packed; `record_dtype(k, num_classes, mixed)`):

    seed     int64        the augmentation seed of the view the teacher saw (-1 in static mode)
    partner  int32        mixed stores only: the position of the sample this view was mixed with
    rest     float32      log of the mean exp(logit) over the classes outside the top k (-inf if none)
    index    int16 x k    top-k class indices, largest logit first (int32 past 32,767 classes)
    value    float16 x k  their logits

That is 12 + 4k bytes, 8 more than the official 4 + 4k (a 64-bit seed and the remainder term), and
16 + 4k for a mixed view: the partner's position is all a mixed record adds, since the mixing draw
(Mixup or CutMix, the coefficient, the box) is re-drawn from the two samples' seeds (`augment.PairMix`),
and the partner's seed is in the partner's own record. The header's `mix` names the mixing settings.
Storing logits plus the remainder rebuilds the teacher's distribution at any temperature: the
top k keep their logits, every other class gets `rest` (the remainder spread uniformly, as the
official implementation does), exact at T = 1 in total mass and exact everywhere when k equals the
class count.

The manifest's header (`StoreHeader`) says what made the records: the teacher, the dataset's
fingerprint, the view, k, the epochs, the data seed, the mixing settings and, from version 3, the
data spec the store was written from (`data`, as the caller gives it). Manifests of versions 1 and
2 still open (see `VERSIONS`). The manifest is checked field by field on open (types, ranges, the
record layout that k and num_classes make, one file per epoch) and carries `manifest_sha256`, the
SHA-256 of its own canonical JSON without that field (`manifest_digest`), so an edit or a flipped
bit is refused. A manifest without the field (written by an older version) is refused as a
`StoreMismatch`, so `precompute_or_reuse` rebuilds such a store.

Reads go through `numpy.memmap`: a lookup by sample position is one slice, O(1). Writing is
append-only in whole batches (`StoreWriter`), one writer per folder and rank at a time (a lock
file, `.lock-rank-RRR`, removed once the store is complete), so an interrupted precompute resumes
by truncating to the last complete batch whose records pass a check (each record carries the seed
of its view and class indices below num_classes); per-rank part files make sharded writes
concatenate into exactly the single-process file. This module knows records, not models or
datasets: it receives their descriptions as values and compares them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .utils import FileLock, atomic_write, atomic_write_text, check_integer

__all__ = [
    "FORMAT",
    "VERSION",
    "VERSIONS",
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
    "writer_lock",
    "remove_store",
    "pending_settings",
    "read_pending",
    "describe_store",
    "manifest_digest",
]

FORMAT = "tinyvit-logit-store"
VERSION = 3
# Every version a store may have been written in: 2 added the header's `mix` and mixed records (a
# version-1 store reads as an unmixed one); 3 renamed the header's `base_seed` to `data_seed` and
# added its `data` (a version-1 or -2 store reads with data None).
VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
FP16_MAX = 65504.0  # the largest finite fp16 value: a stored logit's bound
PENDING = "pending.json"


class StoreMismatch(ValueError):
    """A store that exists but was made for something else (teacher, data, resolution, k)."""


def _is_int(value: object) -> bool:
    """An int and not a bool (JSON's true must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    """`repr(value)`, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_json_scalars(value: dict) -> bool:
    """Whether `value` maps strings to JSON scalars: str, int, finite float, bool or None."""
    return all(
        isinstance(key, str)
        and (item is None or isinstance(item, (str, int, bool)) or (isinstance(item, float) and math.isfinite(item)))
        for key, item in value.items()
    )


def record_dtype(k: int, num_classes: int, mixed: bool = False) -> np.dtype:
    """The packed record layout for top-k of `num_classes`, of a mixed view or not (see the module docstring)."""
    index = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    partner = [("partner", "<i4")] if mixed else []
    return np.dtype([("seed", "<i8"), *partner, ("rest", "<f4"), ("index", index, (k,)), ("value", "<f2", (k,))])


def official_record_bytes(k: int) -> int:
    """Bytes per record in the official TinyViT format for top-k: a 32-bit seed, k fp16 values and
    k int16 indices (4 + 4k; ours adds a 64-bit seed and the remainder term)."""
    return 4 + 4 * k


def record_layout(dtype: np.dtype) -> str:
    """A record layout in words, e.g. 'seed int64, rest float32, index int16 x 10, value float16 x 10'."""
    words = []
    for name in dtype.names:
        kind = dtype.fields[name][0]
        base, shape = kind.subdtype if kind.subdtype else (kind, ())
        words.append(f"{name} {base.name}" + (f" x {int(np.prod(shape))}" if shape else ""))
    return ", ".join(words)


@dataclass(frozen=True)
class StoreHeader:
    """Everything a store promises about its records; compared field by field on open.

    `data` is the data spec the store was written from, as plain JSON values the caller gives
    (`distill` passes `DataSpec.for_store()`): recorded and compared, never interpreted here; None
    when the caller gives none (and for a store written before version 3).

    Raises:
        ValueError: a field of another type than its annotation (an int field given a bool too), a
            dataset without an int `size` >= 0, img_size < 0, a mode other than 'static'/'replay',
            k outside [1, num_classes], epochs < 1 (a static store holds exactly one epoch), a
            num_classes that differs from the dataset's own `num_classes` (when it has one), a `mix`
            in a static store or with other than numbers, or a `data` that does not map strings to
            JSON scalars (str, int, finite float, bool, None).
    """

    teacher: dict  # name, description, weights_sha256
    dataset: dict  # the dataset fingerprint (name, split, size, ID and content hashes)
    img_size: int
    transform: str  # the description of the view the teacher saw
    mode: str  # "static" or "replay"
    k: int
    num_classes: int
    epochs: int
    data_seed: int
    mix: dict = field(default_factory=dict)  # mixed views' settings (`augment.MixConfig.to_dict`); {}: not mixed
    data: dict | None = None  # the data spec the store was written from (see above); None: not recorded

    def __post_init__(self) -> None:
        kinds = {"dict": (dict,), "int": (int,), "str": (str,), "dict | None": (dict, type(None))}
        for spec in fields(self):
            value, kind = getattr(self, spec.name), kinds[spec.type]
            if not isinstance(value, kind) or (int in kind and not _is_int(value)):
                raise ValueError(f"{spec.name} must be of type {spec.type}, got {_short(value)}")
        size = self.dataset.get("size")
        if not _is_int(size) or size < 0:
            raise ValueError(f"dataset size must be an int >= 0, got {_short(size)}")
        if self.img_size < 0:
            raise ValueError(f"img_size={self.img_size} must be >= 0")
        if self.dataset.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} differs from the dataset's num_classes "
                f"{_short(self.dataset['num_classes'])}"
            )
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
        if self.mix and self.mode != "replay":
            raise ValueError(f"mix={self.mix}: only a replay store holds mixed views")
        if self.mix and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.mix.values()):
            raise ValueError(f"mix must map setting names to numbers, got {_short(self.mix)}")
        if self.data is not None and not _is_json_scalars(self.data):
            raise ValueError(f"data must map names to JSON scalars, got {_short(self.data)}")

    @property
    def size(self) -> int:
        return int(self.dataset["size"])

    @property
    def dtype(self) -> np.dtype:
        return record_dtype(self.k, self.num_classes, mixed=bool(self.mix))

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
            data_seed=self.data_seed,
            mix=self.mix,
            data=self.data,
        )

    def differences(self, other: StoreHeader) -> list[str]:
        """Human-readable differences, e.g. ["k: store 10, asked 5"], the shortest first (a mode or an
        epoch count before a transform's long description)."""
        ours, theirs = self.to_dict(), other.to_dict()
        lines = [f"{key}: store {ours[key]!r}, asked {theirs[key]!r}" for key in ours if ours[key] != theirs[key]]
        return sorted(lines, key=len)


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.bin"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- encode / decode


def encode_records(
    logits: torch.Tensor, seeds: torch.Tensor | list[int], k: int, partners: list[int] | None = None
) -> np.ndarray:
    """Records for a batch of dense logits (B, C): top-k logits and indices, the remainder, the seeds,
    and for mixed views the partners' positions.

    Raises:
        ValueError: a logit that is not finite, or too large for fp16 (|z| > 65504): the row is named.
    """
    logits = logits.detach().float().cpu()
    batch, num_classes = logits.shape
    bad = (~torch.isfinite(logits) | (logits.abs() > FP16_MAX)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        row = logits[bad[0]]
        worst = row[~torch.isfinite(row)][0] if not torch.isfinite(row).all() else row.abs().max()
        raise ValueError(
            f"the teacher gave a logit of {worst.item()} for the batch's row {bad[0]} ({len(bad)} row(s) in all): "
            f"a store keeps finite logits of at most {FP16_MAX:g} in magnitude (fp16)"
        )
    values, indices = logits.topk(k, dim=1)  # (B, k), sorted, largest first
    if k < num_classes:
        # log(mean over the other C - k classes of exp(z)), from those classes alone: no cancellation
        # however small their share of the total
        others = logits.double().scatter(1, indices, -math.inf)
        rest = torch.logsumexp(others, dim=1) - math.log(num_classes - k)
    else:
        rest = torch.full((batch,), -math.inf, dtype=torch.float64)
    out = np.empty(batch, dtype=record_dtype(k, num_classes, mixed=partners is not None))
    out["seed"] = np.asarray(seeds, dtype=np.int64)
    if partners is not None:
        out["partner"] = np.asarray(partners, dtype=np.int32)
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


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of a manifest's canonical JSON (sorted keys, no spaces, ASCII) without its own
    `manifest_sha256` field: what a store writes into that field and compares on open."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def _why_no_store(path: Path) -> str:
    """Why there is no store at `path`, to follow 'no logit store at PATH' ('' if nothing is there)."""
    if not path.exists():
        return ""
    if not path.is_dir():
        return " (it is a file, not a store folder)"
    names = sorted(entry.name for entry in path.iterdir())
    if not names:
        return " (the folder is empty)"
    if any(name == PENDING or ".part-" in name or name.startswith(".lock-rank-") for name in names):
        return " (an unfinished precompute: run it again to complete it)"
    return f" (the folder holds {len(names)} other file(s), such as {names[:3]}, and no {MANIFEST})"


def _load_manifest(manifest_path: Path) -> dict:
    """The JSON object in `manifest_path`.

    Raises:
        ValueError: the file is not UTF-8, not JSON, or not a JSON object.
    """
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{manifest_path} is not UTF-8 text (byte {exc.start}): it is corrupted") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} is not a JSON object: it is corrupted")
    return manifest


def _manifest_header(manifest: dict, path: Path) -> StoreHeader:
    """The header of the manifest of the store at `path`, every field checked (a version-1 or -2
    header read as the current one, see `_current_header`).

    Raises:
        ValueError: another format or version, a top-level field missing or unknown, or a header
            whose fields are not exactly its version's or fail `StoreHeader`'s checks (the field is
            named).
    """
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or not _is_int(version) or version not in VERSIONS:
        raise ValueError(
            f"{path} is not a {FORMAT} " + ", ".join(f"v{v}" for v in VERSIONS[:-1]) + f" or v{VERSION} store "
            f"(format={_short(manifest.get('format'))}, version={_short(version)})"
        )
    expected = {"format", "version", "header", "record", "files", "manifest_sha256"}
    missing, unknown = sorted(expected - {"manifest_sha256"} - manifest.keys()), sorted(manifest.keys() - expected)
    if missing or unknown:
        raise ValueError(f"{path / MANIFEST}: missing field(s) {missing}, unknown field(s) {unknown}")
    header = manifest["header"]
    if not isinstance(header, dict):
        raise ValueError(f"{path / MANIFEST}: the header must be a JSON object, got {_short(header)}")
    names = _header_names(version)
    if version == 1 and "mix" not in header:  # version 1 held no mixed views: its records are v2's unmixed ones
        header = dict(header, mix={})
    if header.keys() != names:
        missing, unknown = sorted(names - header.keys()), sorted(header.keys() - names)
        raise ValueError(f"{path / MANIFEST}: header: missing field(s) {missing}, unknown field(s) {unknown}")
    try:
        return StoreHeader(**_current_header(header, version))
    except ValueError as exc:
        raise ValueError(f"{path / MANIFEST}: header {exc}") from None


def _header_names(version: int) -> set[str]:
    """The header fields a manifest of `version` holds: before version 3, `base_seed` for
    `data_seed` and no `data`."""
    names = {spec.name for spec in fields(StoreHeader)}
    return names if version >= 3 else names - {"data_seed", "data"} | {"base_seed"}


# Before version 3, a view's description (`transform`) also listed the pair-mixing settings, which the
# header's `mix` holds; the view they describe is the same.
_OLD_MIX_FIELDS = re.compile(r", mixup_alpha=[^,)]*, cutmix_alpha=[^,)]*, mix_prob=[^,)]*, mix_switch_prob=[^,)]*")


def _current_header(header: dict, version: int) -> dict:
    """A header of `version`'s fields (`_header_names`) under the current ones: a version-1 or -2
    header's `base_seed` is `data_seed`, its `data` None (not recorded), and its `transform` loses
    the mixing settings that the view descriptions of those versions listed."""
    if version >= 3:
        return header
    current = {key: value for key, value in header.items() if key != "base_seed"}
    transform = _OLD_MIX_FIELDS.sub("", str(header.get("transform", "")))
    return dict(current, data_seed=header["base_seed"], data=None, transform=transform)


def _check_record_and_files(manifest: dict, header: StoreHeader, manifest_path: Path) -> None:
    """Check that the manifest's record description and file list are the ones `header` makes.

    Raises:
        ValueError: record bytes or layout other than k and num_classes make, or a file list that is
            not one entry (name, epoch, records, sha256) per epoch, in order, each of `size` records.
    """
    record, dtype = manifest["record"], header.dtype
    if not isinstance(record, dict) or record.keys() != {"bytes", "layout"}:
        raise ValueError(f"{manifest_path}: 'record' must hold bytes and layout, got {_short(record)}")
    if not _is_int(record["bytes"]) or record["bytes"] != dtype.itemsize:
        raise ValueError(
            f"{manifest_path}: record bytes {_short(record['bytes'])} do not fit the header: "
            f"k={header.k} of num_classes={header.num_classes} make records of {dtype.itemsize} bytes"
        )
    if record["layout"] != str(dtype.descr):
        raise ValueError(f"{manifest_path}: record layout {_short(record['layout'])} is not {str(dtype.descr)!r}")
    files = manifest["files"]
    if not isinstance(files, list) or len(files) != header.epochs:
        raise ValueError(f"{manifest_path}: 'files' must list {header.epochs} record file(s), one per epoch")
    for epoch, entry in enumerate(files):
        expected = dict(name=epoch_file(epoch), epoch=epoch, records=header.size)
        if not _is_file_entry(entry, expected):
            raise ValueError(f"{manifest_path}: files[{epoch}] must be {expected} and a sha256, got {_short(entry)}")


def _is_file_entry(entry: object, expected: dict) -> bool:
    """Whether a manifest's `files` entry is `expected` (name, epoch, records) plus a hex SHA-256."""
    if not isinstance(entry, dict) or entry.keys() != {*expected, "sha256"}:
        return False
    digest = entry["sha256"]
    return (
        all(entry[key] == value and type(entry[key]) is type(value) for key, value in expected.items())
        and isinstance(digest, str)
        and len(digest) == 64
        and set(digest) <= set("0123456789abcdef")
    )


def _read_manifest(path: Path) -> tuple[dict, StoreHeader]:
    """The manifest of the store at `path` and its header, checked field by field and against its
    own `manifest_sha256`.

    Raises:
        FileNotFoundError: no manifest; the message says whether `path` is missing, a file, an
            empty folder, an unfinished precompute or a folder of other files.
        ValueError: a manifest that is not UTF-8 JSON, not of this format/version, malformed (the
            field is named: see `_manifest_header` and `_check_record_and_files`), or changed after
            it was written.
        StoreMismatch: a manifest without `manifest_sha256` (written by an older version).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no logit store at {path}{_why_no_store(path)}")
    manifest = _load_manifest(manifest_path)
    header = _manifest_header(manifest, path)
    _check_record_and_files(manifest, header, manifest_path)
    if "manifest_sha256" not in manifest:
        raise StoreMismatch(
            f"{manifest_path} has no manifest_sha256: the store was written by an older version of tinyvit_lib "
            "and cannot be checked for edits; precompute it again"
        )
    if manifest["manifest_sha256"] != manifest_digest(manifest):
        raise ValueError(
            f"{manifest_path} was changed after it was written: its manifest_sha256 does not match its "
            "contents (write the store again rather than editing it)"
        )
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
        FileNotFoundError: no store at the path (the message tells a missing path, a file, an empty
            folder, an unfinished precompute and a folder of other files apart).
        ValueError: a manifest that is not UTF-8 JSON, not of this format/version, has a field of
            the wrong type or range or one that does not fit the record layout (the field is named),
            or was changed after it was written; a record file of the wrong size, or a checksum
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
            ValueError: a replay store asked for an epoch it does not hold, or positions that are not
                a 1-D sequence of integers (a float or bool position is not rounded or read as 0/1).
            IndexError: a position outside the store, named in the message.
        """
        if self.header.mode == "static":
            epoch = 0
        elif not 0 <= epoch < self.header.epochs:
            raise ValueError(
                f"replay store {self.path} holds epochs 0..{self.header.epochs - 1}, asked {epoch}: "
                f"precompute at least as many epochs as you train"
            )
        given = positions.numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        if given.ndim != 1 or not (given.size == 0 or np.issubdtype(given.dtype, np.integer)):
            raise ValueError(f"positions must be a 1-D sequence of integers, got {given.dtype} of shape {given.shape}")
        positions = given.astype(np.int64, copy=False)
        bad = positions[(positions < 0) | (positions >= self.header.size)]
        if bad.size:
            raise IndexError(
                f"sample id(s) {bad[:5].tolist()} not in logit store {self.path} ({self.header.size} samples)"
            )
        return np.asarray(self._maps[epoch][positions])

    def logits(self, epoch: int, positions) -> torch.Tensor:
        """Rebuilt dense logits (B, C) for the samples at `positions` (see `rebuild_logits`)."""
        return rebuild_logits(self.records(epoch, positions), self.header.num_classes)


# ----------------------------------------------------------------------------- writing: claiming the folder


def pending_settings(header: StoreHeader, *, batch_size: int, world_size: int) -> dict:
    """What an unfinished precompute records in pending.json; it is resumed only with exactly these."""
    return dict(header=header.to_dict(), batch_size=batch_size, world_size=world_size)


def read_pending(path: str | Path) -> dict | None:
    """The pending.json of the store folder `path`: None when there is none, {} when it cannot be read
    as a JSON object (then it matches no settings)."""
    pending = Path(path) / PENDING
    if not pending.is_file():
        return None
    try:
        found = json.loads(pending.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def writer_lock(path: str | Path, *, rank: int = 0, world_size: int = 1) -> FileLock:
    """The lock that rank `rank`'s writer of the store at `path` holds while it writes (not yet taken)."""
    what = f"logit store {path}" + (f" (rank {rank})" if world_size > 1 else "")
    return FileLock(Path(path) / f".lock-rank-{rank:03d}", what=what)


# What a store folder holds, complete or not: the manifest, epoch files and a writer's parts, pending
# settings and lock files, and `atomic_write`'s temporary files.
_STORE_FILE = re.compile(r"manifest\.json|pending\.json|epoch-\d{4}\.(bin|part-\d{3})|\.lock-rank-\d{3}|\..+\.\d+\.tmp")


def remove_store(path: str | Path) -> None:
    """Remove the store folder at `path`, complete or unfinished, under its writer's lock; nothing if
    there is no such folder. A folder holding anything a store does not is left as it is.

    Raises:
        ValueError: `path` is a file, or holds files that are not a store's (some are named).
        LockHeld: another process is writing a store at `path`.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a logit store: it is left as it is")
    foreign = sorted(entry.name for entry in path.iterdir() if not _STORE_FILE.fullmatch(entry.name))
    if foreign:
        raise ValueError(
            f"{path} holds {len(foreign)} file(s) that are not a logit store's, such as {foreign[:3]}: "
            "it is not removed (choose another path, or empty it yourself)"
        )
    with writer_lock(path):  # never remove a store that another process is writing (LockHeld)
        shutil.rmtree(path)


def _cannot_write(path: Path, exc: OSError) -> ValueError:
    """The refusal of a store folder the OS will not let us create or write, naming its reason."""
    return ValueError(f"cannot write a logit store at {path}: {exc.strerror or exc}")


def _claim(path: Path, lock: FileLock, wanted: dict, *, rank: int) -> None:
    """Create the store folder `path`, take this rank's `lock`, then check its pending.json against
    `wanted` (`pending_settings`); rank 0 writes it when there is none. A refused claim holds no lock.

    Raises:
        ValueError: `path` is a file, or the folder cannot be created or written (a file above it,
            a read-only file system, no permission: the path and the OS's reason are named).
        FileExistsError: `path` already holds a complete store (also checked once the lock is held).
        LockHeld: another process holds `lock`.
        StoreMismatch: pending.json describes other settings than `wanted`.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write a logit store at {path}: it is a file, not a folder")
    _refuse_a_complete_store(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        _refuse_a_complete_store(path)  # finished by another writer while this one waited to start
        _check_pending(path, wanted, rank=rank)
    except BaseException:
        _release(path, lock)
        raise


def _refuse_a_complete_store(path: Path) -> None:
    """Raises FileExistsError if `path` holds a manifest (a complete store)."""
    if (path / MANIFEST).exists():
        raise FileExistsError(f"{path} already holds a complete logit store; remove it or choose another path")


def _check_pending(path: Path, wanted: dict, *, rank: int) -> None:
    """Raises StoreMismatch if the pending.json in `path` describes other settings than `wanted`;
    rank 0 writes it if absent (ValueError if it cannot, naming the OS's reason)."""
    found = read_pending(path)
    if found is not None:
        if found != wanted:
            diffs = [k for k in wanted if found.get(k) != wanted[k]]
            raise StoreMismatch(
                f"{path} holds an unfinished precompute with other settings ({diffs}); "
                "remove it or finish it with the same settings"
            )
    elif rank == 0:
        try:
            atomic_write_text(path / PENDING, json.dumps(wanted, indent=2))
        except OSError as exc:
            raise _cannot_write(path, exc) from None


def _release(path: Path, lock: FileLock) -> None:
    """Release `lock`, removing its file if the store at `path` is complete. Idempotent."""
    if lock.held and (path / MANIFEST).exists():
        lock.path.unlink(missing_ok=True)  # a writer arriving now finds the manifest and stops
    lock.release()


# ----------------------------------------------------------------------------- writing: checking and resuming parts


def _part_file(path: Path, epoch: int, rank: int) -> Path:
    """Rank `rank`'s part of `epoch`'s record file in the store folder `path`."""
    return path / f"epoch-{epoch:04d}.part-{rank:03d}"


@dataclass(frozen=True)
class _RecordCheck:
    """What every record of a store must carry: the seed of its sample's view (`seeds(epoch,
    positions)` in replay mode, -1 in static mode), for mixed views its partner's position
    (`partners(epoch, positions)`), and class indices in [0, num_classes)."""

    header: StoreHeader
    seeds: Callable[[int, np.ndarray], np.ndarray] | None
    partners: Callable[[int, np.ndarray], np.ndarray] | None

    def problem(self, epoch: int, first: int, records: np.ndarray) -> str | None:
        """What is wrong with `records`, those of positions first, first + 1, ... in `epoch` (None:
        nothing): the first record whose seed (or partner) is not its view's, or with a class index
        outside [0, num_classes)."""
        positions = np.arange(first, first + len(records), dtype=np.int64)
        if self.header.mode == "replay":
            expected = np.asarray(self.seeds(epoch, positions), dtype=np.int64)
        else:
            expected = np.full(len(records), -1, dtype=np.int64)
        wrong_seed = records["seed"] != expected
        partners = np.asarray(self.partners(epoch, positions), dtype=np.int64) if self.header.mix else None
        if partners is not None:
            wrong_seed |= records["partner"] != partners
        wrong_index = ((records["index"] < 0) | (records["index"] >= self.header.num_classes)).any(axis=1)
        bad = np.flatnonzero(wrong_seed | wrong_index)
        if not bad.size:
            return None
        i = int(bad[0])
        record = f"the record of position {positions[i]} in epoch {epoch}"
        if wrong_seed[i]:
            found, wanted = f"seed {records['seed'][i]}", str(expected[i])
            if partners is not None:
                found, wanted = f"{found}, partner {records['partner'][i]}", f"{wanted}, partner {partners[i]}"
            return f"{record} carries {found}, expected {wanted}: not the view of that sample"
        return f"{record} holds a class index outside [0, {self.header.num_classes})"


@dataclass(frozen=True)
class _RankParts:
    """One rank's share of a store's batches and its part files (see `StoreWriter`): batch b holds
    positions [b*B, (b+1)*B); rank r of `world_size` owns a contiguous run of them, `batches`."""

    path: Path
    header: StoreHeader
    batch_size: int
    rank: int
    world_size: int

    @property
    def batches(self) -> range:
        num_batches = math.ceil(self.header.size / self.batch_size)
        share = math.ceil(num_batches / self.world_size)
        return range(min(self.rank * share, num_batches), min((self.rank + 1) * share, num_batches))

    def batch_len(self, batch: int) -> int:
        return min(self.batch_size, self.header.size - batch * self.batch_size)

    def good_batches(self, epoch: int, check: _RecordCheck) -> int:
        """How many of this rank's batches its part of `epoch` holds whole and passing `check`, from
        its start (a warning names the first record that fails)."""
        part, dtype = _part_file(self.path, epoch, self.rank), self.header.dtype
        if not part.exists():
            return 0
        records = np.fromfile(part, dtype=dtype, count=part.stat().st_size // dtype.itemsize)
        done, start = 0, 0
        for batch in self.batches:
            length = self.batch_len(batch)
            if start + length > len(records):
                break
            problem = check.problem(epoch, batch * self.batch_size, records[start : start + length])
            if problem:  # stacklevel: the caller of `StoreWriter.todo`
                warnings.warn(f"{part}: {problem}; keeping the {done} batch(es) before it", stacklevel=4)
                break
            done, start = done + 1, start + length
        return done

    def resume(self, epoch: int, check: _RecordCheck) -> range:
        """This rank's batches of `epoch` still to compute, its part truncated to the good ones."""
        if (self.path / epoch_file(epoch)).exists():
            return range(0)
        part = _part_file(self.path, epoch, self.rank)
        done = self.good_batches(epoch, check)
        kept = sum(self.batch_len(b) for b in self.batches[:done]) * self.header.dtype.itemsize
        if part.exists() and part.stat().st_size != kept:
            with open(part, "r+b") as f:
                f.truncate(kept)
        return self.batches[done:]

    def append(self, epoch: int, records: np.ndarray) -> None:
        """Append the next batch of this rank's part of `epoch` (see `StoreWriter.append`)."""
        if not 0 <= epoch < self.header.epochs:
            raise ValueError(f"epoch={epoch} outside the store's [0, {self.header.epochs})")
        if records.dtype != self.header.dtype:
            raise ValueError(f"records of dtype {records.dtype} for a store of {self.header.dtype} (k={self.header.k})")
        part = _part_file(self.path, epoch, self.rank)
        have, expected = part.stat().st_size // self.header.dtype.itemsize if part.exists() else 0, None
        for batch in self.batches:  # the batch that starts where the part ends
            if have == 0:
                expected = self.batch_len(batch)
                break
            have -= self.batch_len(batch)
        if expected is None or len(records) != expected:
            wanted = "no more batches" if expected is None else f"{expected} records"
            raise ValueError(f"epoch {epoch}'s part of rank {self.rank} takes {wanted} next, not {len(records)}")
        with open(part, "ab") as f:
            f.write(records.tobytes())
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- writing: sealing the store


def _epoch_entry(path: Path, epoch: int, check: _RecordCheck, *, world_size: int) -> dict:
    """Write `epoch`'s record file from its `world_size` parts (unless an earlier `finish` did)
    after checking every record; its manifest entry.

    Raises:
        ValueError: the parts (or the record file) hold other than `size` records, or a record
            fails `check`; nothing is written.
    """
    header = check.header
    final, expected = path / epoch_file(epoch), header.size * header.dtype.itemsize
    if final.exists():  # assembled by a `finish` that stopped before the manifest
        data, source = final.read_bytes(), f"{final}: remove it and run the precompute again"
    else:
        parts = [_part_file(path, epoch, rank) for rank in range(world_size)]
        data = b"".join(part.read_bytes() for part in parts if part.exists())
        source = f"epoch {epoch}'s parts: run the precompute again (it keeps the batches before this record)"
        if len(data) != expected:
            raise ValueError(
                f"epoch {epoch}: the parts hold {len(data)} bytes, expected {expected}; "
                "some rank did not finish: run the precompute again"
            )
    if len(data) != expected:
        raise ValueError(f"{final} has {len(data)} bytes, expected {expected}: remove it and run the precompute again")
    problem = check.problem(epoch, 0, np.frombuffer(data, dtype=header.dtype))
    if problem:
        raise ValueError(f"{problem}, in {source}")
    if not final.exists():
        atomic_write(final, lambda out: out.write(data))
    return dict(name=final.name, epoch=epoch, records=header.size, sha256=hashlib.sha256(data).hexdigest())


def _seal(path: Path, header: StoreHeader, files: list[dict]) -> None:
    """Write the manifest of the store at `path` (its `files` entries, sealed by `manifest_digest`),
    then remove the part files and pending.json."""
    manifest = dict(
        format=FORMAT,
        version=VERSION,
        header=header.to_dict(),
        record=dict(bytes=header.dtype.itemsize, layout=str(header.dtype.descr)),
        files=files,
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for epoch in range(header.epochs):
        for part in path.glob(f"epoch-{epoch:04d}.part-*"):
            part.unlink(missing_ok=True)
    (path / PENDING).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- writing: the writer


class StoreWriter:
    """Writes one store, resumably, in whole batches; one writer per rank when sharded.

    Batches are numbered over the dataset in order (batch b holds positions [b*B, (b+1)*B)); rank r
    of `world_size` owns a contiguous run of batches and appends their records to its part file
    `epoch-XXXX.part-RRR` (the same batch composition as one process, so the same bytes). Run again
    after a kill, a writer keeps the complete batches already on disk and reports which to compute
    next. `finish()` (rank 0, after every rank is done) concatenates the parts, checksums the files
    and writes the manifest last.

    One writer at a time: from construction until `finish()`, `close()` or the end of its process
    (also as a `with` block), a writer holds its rank's lock file `.lock-rank-RRR` in the folder.
    A second precompute on the same folder is refused on every rank the two share, while the ranks
    of one sharded job do not collide; the lock files are removed once the store is complete.

    Records are checked before they are kept: each must carry the seed of its sample's view
    (`seeds(epoch, positions)` in replay mode, -1 in static mode) and class indices in
    [0, num_classes). A resumed part keeps its batches from the start while they are whole and
    pass, and is truncated before the first that fails (with a warning naming the record); the rest
    is computed again. `finish()` refuses to write a manifest over a record that fails.

    The parts: `_claim` (the folder, the lock, pending.json), `_RecordCheck` and `_RankParts` (what
    a record must carry; this rank's batches and part files), `_epoch_entry` and `_seal` (the
    record files and the manifest).

    Args:
        seeds: replay mode (required there): the seed each record at `positions` (an int64 array)
            must carry in `epoch`, as an int64 array. Ignored in static mode.
        partners: mixed views (required there): the partner each record at `positions` must name.

    Raises:
        ValueError: batch_size or world_size not an integer >= 1, rank outside [0, world_size), a
            header that cannot be written as JSON, a replay header without `seeds`, a mixed one without `partners`,
            or a folder that cannot be created or written (a file at `path` or above it, a
            read-only file system, no permission: the path and the OS's reason are named).
        FileExistsError: `path` already holds a complete store.
        LockHeld: another process is writing this store on this rank (the message names it).
        StoreMismatch: an unfinished precompute with other settings is at `path`.
    """

    def __init__(
        self,
        path: str | Path,
        header: StoreHeader,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seeds: Callable[[int, np.ndarray], np.ndarray] | None = None,
        partners: Callable[[int, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
            check_integer(name, value, low=low)
        if rank >= world_size:
            raise ValueError(f"rank={rank} must be below world_size={world_size}")
        try:
            json.dumps(header.to_dict())
        except TypeError as exc:  # e.g. a Path as the teacher's name: refused before the folder exists
            raise ValueError(f"the store's header cannot be written as JSON: {exc}") from None
        if header.mode == "replay" and seeds is None:
            raise ValueError("a replay store's writer needs `seeds`: the seed of each record's view")
        if header.mix and partners is None:
            raise ValueError("a mixed store's writer needs `partners`: the partner of each record's view")
        self.path, self.header, self.batch_size = Path(path), header, batch_size
        self.rank, self.world_size, self.seeds, self.partners = rank, world_size, seeds, partners
        self._lock = writer_lock(self.path, rank=rank, world_size=world_size)
        wanted = pending_settings(header, batch_size=batch_size, world_size=world_size)
        _claim(self.path, self._lock, wanted, rank=rank)
        self._check = _RecordCheck(header, seeds, partners)
        self._parts = _RankParts(self.path, header, batch_size, rank, world_size)
        self.batches = self._parts.batches

    def close(self) -> None:
        """Release this rank's lock, removing its lock file if the store is complete. Idempotent."""
        _release(self.path, self._lock)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def todo(self, epoch: int) -> range:
        """This rank's batches of `epoch` still to compute: a part already on disk is truncated to
        its whole batches that pass the record check, counted from its start (see the class docstring)."""
        return self._parts.resume(epoch, self._check)

    def positions(self, batch: int) -> range:
        start = batch * self.batch_size
        return range(start, start + self._parts.batch_len(batch))

    def append(self, epoch: int, records: np.ndarray) -> None:
        """Append one batch's records (in position order) to this rank's part for `epoch`: the next
        batch `todo` named, in the store's record dtype.

        Raises:
            ValueError: an epoch outside the store's, records of another dtype (another k), or
                another count than the next batch's (a batch appended twice, or one skipped).
        """
        self._parts.append(epoch, records)

    def finish(self) -> LogitStore:
        """Concatenate every rank's parts into the epoch files, check every record, checksum the
        files, write the manifest (sealed by `manifest_digest`), then remove the parts and release
        the lock.

        Raises:
            ValueError: a part is missing or short (a rank did not finish), or a record fails the
                check (see the class docstring); no manifest is written.
        """
        files = [
            _epoch_entry(self.path, epoch, self._check, world_size=self.world_size)
            for epoch in range(self.header.epochs)
        ]
        _seal(self.path, self.header, files)
        self.close()
        return LogitStore.open(self.path, verify=False)


# ----------------------------------------------------------------------------- describing


def describe_store(path: str | Path) -> dict:
    """What the store at `path` holds, read from its manifest and files alone (no teacher, no data).

    Returns a dict: `path`, `format`, `version` (the manifest's), every `StoreHeader` field
    (teacher: name, parameters, weights_sha256; dataset: its fingerprint; img_size, transform, mode,
    k, num_classes, epochs, data_seed, mix, and `data`: the data spec the store was written from,
    None when it records none), `images` (records per epoch), `records` (in all),
    `bytes_per_record`, `official_bytes_per_record` (`official_record_bytes(k)`), `layout` (in
    words), `files` (one dict per record file: name, epoch, bytes on disk or None, sha256 from the
    manifest, and `problem`, None when the file is there, of the right size and matches its
    checksum) and `ok` (no file has a problem). Every file is read once to check its checksum.

    Raises:
        FileNotFoundError: no store at `path` (or an unfinished one).
        ValueError: a manifest that is not JSON, not of this format/version, malformed (the field
            is named) or changed after it was written.
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
        version=manifest["version"],
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
    precompute at k up to that fp16 rounding. An existing complete store at `path` is reused when it
    was derived from this store's teacher and data; otherwise it is derived again.

    Raises:
        ValueError: k not in [1, store.k), `path` the store's own folder, a `path` holding files that
            are not a store's (`remove_store`), or as `StoreWriter`.
        LockHeld: another process is writing a store at `path`.
    """
    header = store.header
    if not 1 <= k < header.k:
        raise ValueError(f"k={k} must be between 1 and the store's k - 1 ({header.k - 1})")
    path, small = Path(path), StoreHeader(**dict(header.to_dict(), k=k))
    if path.resolve() == Path(store.path).resolve():
        raise ValueError(f"path={str(path)!r} is the store derived from: a smaller k goes to another folder")
    if (path / MANIFEST).exists():
        try:
            return LogitStore.open(path, expect=small)
        except StoreMismatch:  # derived from another store (an older teacher, other data): derive it again
            remove_store(path)
    with StoreWriter(
        path,
        small,
        batch_size=max(header.size, 1),
        seeds=lambda epoch, positions: store.records(epoch, positions)["seed"],
        partners=(lambda epoch, positions: store.records(epoch, positions)["partner"]) if header.mix else None,
    ) as writer:
        for epoch in range(header.epochs):
            if writer.todo(epoch):
                writer.append(epoch, _smaller_k_records(store, epoch, k, small))
        return writer.finish()


def _smaller_k_records(store: LogitStore, epoch: int, k: int, small: StoreHeader) -> np.ndarray:
    """`epoch`'s records of `store` cut to the top `k`, the rest folded into the remainder."""
    header = store.header
    records = store.records(epoch, np.arange(header.size))
    values = records["value"].astype(np.float64)  # (N, k_old)
    others = header.num_classes - header.k
    tail = np.exp(values[:, k:])  # entries k+1..k_old move into the remainder
    rest_mass = (others * np.exp(records["rest"].astype(np.float64)) if others else 0.0) + tail.sum(axis=1)
    out = np.empty(header.size, dtype=small.dtype)
    out["seed"], out["index"] = records["seed"], records["index"][:, :k]
    if header.mix:
        out["partner"] = records["partner"]
    out["value"] = records["value"][:, :k]
    out["rest"] = np.log(rest_mass / (header.num_classes - k)).astype(np.float32)
    return out
