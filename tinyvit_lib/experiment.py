"""One training run described by plain values: what the CLI and the notebooks both call.

`RunSpec` names the data, the model, the teacher (online model or stored logits) and the
hyper-parameters; `prepare_run` turns it into datasets and models (validating everything before
anything is written), and `run` trains. A checkpoint's `model_config` records how to rebuild the
model, so `load_trained` can bring back any model this module trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import data
from .data import DatasetWithIDs, DataSpec
from .distill import OnlineTeacher, StoredTeacher, Teacher, store_spec_differences, weights_sha256
from .logit_store import LogitStore, StoreMismatch
from .stats import condition_summary, paired_gain
from .teachers import build_model, load_weights, start_from
from .trainer import TrainConfig, TrainResult, evaluate, pick_device, saved_config, train, training_autocast
from .utils import FileLock, atomic_write_text, check_writable_folder, load_checkpoint, project_root

__all__ = [
    "RunSpec",
    "PreparedRun",
    "open_store",
    "validation_set",
    "test_set",
    "measure",
    "prepare_run",
    "init_notes",
    "run",
    "run_or_reuse",
    "run_differences",
    "check_resumable",
    "refuse_if_running",
    "run_digest",
    "run_history",
    "load_trained",
    "evaluate_run",
    "ResultsLog",
    "sweep_point",
    "row_line",
    "spec_digest",
    "reusable_row",
    "autocast_identity",
    "file_sha256",
    "checkpoint_identity",
    "choose_on_validation",
    "condition_summary",
    "paired_gain",
]


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """A run, described by values: its data (`DataSpec`), the model, where the teacher comes from
    (none, a model run online, or a logit store), and the hyper-parameters. `name` is the folder
    under `output_dir`.

    Raises:
        ValueError: both an online teacher and a store, or a teacher checkpoint without its model.
    """

    name: str
    data: DataSpec = DataSpec()
    model: str = "tinyvit_5m"
    # start from this checkpoint's weights: a run's last.pt, or TinyViT's released weights (official or timm
    # names, .pth or .safetensors; another class count or resolution is adapted: `teachers.start_from`)
    init_from: str | None = None
    teacher_model: str | None = None  # online distillation: the teacher's architecture
    teacher_checkpoint: str | None = None  # its weights
    logits_path: str | None = None  # distillation from a logit store
    output_dir: str = "runs"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.teacher_model and self.logits_path:
            raise ValueError("choose one teacher: an online teacher_model or a logits_path store, not both")
        if self.teacher_checkpoint and not self.teacher_model:
            raise ValueError("teacher_checkpoint needs teacher_model (the architecture to load it into)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def distills(self) -> bool:
        """Whether the run learns from a teacher: it has one, and alpha > 0."""
        return bool(self.teacher_model or self.logits_path) and self.train.alpha > 0


@dataclass
class PreparedRun:
    spec: RunSpec
    model: nn.Module
    train_set: DatasetWithIDs
    val_set: DatasetWithIDs
    teacher: Teacher | None
    model_config: dict


def validation_set(spec: RunSpec) -> DatasetWithIDs:
    """The whole validation set of a run (see `data.validation_set`)."""
    return data.validation_set(spec.data)


def test_set(spec: RunSpec) -> DatasetWithIDs:
    """The held-out split, for a run's final numbers only: refused for a run that validated on it
    (see `data.test_set`; the message names the run).

    Raises:
        ValueError, FileNotFoundError: as `data.test_set`.
    """
    try:
        return data.test_set(spec.data)
    except ValueError as exc:
        raise ValueError(f"run {spec.name!r}: {exc}") from None


test_set.__test__ = False  # a function named test_*, not a test: pytest must not collect it when imported


def open_store(spec: RunSpec) -> LogitStore:
    """The run's logit store, checked against the run's data spec before any data is loaded.

    Raises:
        StoreMismatch: the store was written for other data (every differing field is named).
        FileNotFoundError, ValueError: as `LogitStore.open`.
    """
    store = LogitStore.open(spec.logits_path)
    problems = store_spec_differences(store.header, spec.data)
    if problems:
        raise StoreMismatch(f"logit store {spec.logits_path} was written for other data: " + "; ".join(problems))
    return store


def prepare_run(spec: RunSpec) -> PreparedRun:
    """Load the data, build the model (initialised from `spec.train.seed`, so the same spec gives the
    same starting weights in any process) and the teacher. Writes nothing. A store is checked against
    the run's data spec before the data loads.

    Raises:
        ValueError, FileNotFoundError: bad names, missing data or checkpoints (see `get_dataset`,
            `build_model`, `load_weights`; `init_from` included), a run folder that cannot be
            created or written.
        StoreMismatch: a store written for other data (see `open_store`).
        LockHeld: another process is training this run.
    """
    if spec.init_from and not Path(spec.init_from).is_file():
        raise FileNotFoundError(f"init_from={spec.init_from}: no such checkpoint (a run's last.pt to fine-tune)")
    check_writable_folder(spec.run_dir, what="run folder")
    refuse_if_running(spec)
    store = open_store(spec) if spec.logits_path else None  # checked even when alpha = 0 leaves it unused
    train_set, val_set = data.build(spec.data)
    model_config = _model_config(spec, train_set)
    with torch.random.fork_rng(devices=[]):  # the initialisation is the run's seed, not the caller's RNG state
        torch.manual_seed(spec.train.seed)
        model = build_model(**model_config)
    if spec.init_from:  # fine-tuning: the pretrained weights replace the initialisation
        for note in start_from(model, spec.init_from):
            print(f"{spec.name}: {note}")
    teacher: Teacher | None = None
    if spec.distills and spec.teacher_model:
        teacher_net = build_model(spec.teacher_model, **{k: v for k, v in model_config.items() if k != "name"})
        if spec.teacher_checkpoint:
            load_weights(teacher_net, spec.teacher_checkpoint)
        teacher = OnlineTeacher(teacher_net)
    elif spec.distills and store is not None:
        teacher = StoredTeacher(store, train_set, epochs=spec.train.epochs)  # enough replayed epochs?
    return PreparedRun(spec, model, train_set, val_set, teacher, model_config)


def init_notes(spec: RunSpec) -> list[str]:
    """What starting a run of `spec` from its `init_from` file does to the model (e.g. "head
    replaced: ..."), without training: the lines `prepare_run` prints, for a run that is reused.
    [] without `init_from`.

    Raises:
        FileNotFoundError, ValueError: as `prepare_run` for the data and the weights file.
    """
    if not spec.init_from:
        return []
    train_set, _ = data.build(spec.data)
    return start_from(build_model(**_model_config(spec, train_set)), spec.init_from)


def _model_config(spec: RunSpec, train_set: DatasetWithIDs) -> dict:
    """The model a run of `spec` builds (`build_model`'s arguments): its class and channel count
    follow the data."""
    return dict(
        name=spec.model, num_classes=train_set.num_classes, in_chans=train_set.out_chans, img_size=spec.data.img_size
    )


def run(spec: RunSpec | PreparedRun, *, resume: bool = False, progress: bool = True, on_epoch=None) -> TrainResult:
    """Train one run, from a spec or from what `prepare_run` returned (see there and `trainer.train`
    for what is raised)."""
    prepared = spec if isinstance(spec, PreparedRun) else prepare_run(spec)
    spec = prepared.spec
    if resume:
        check_resumable(spec)
    return train(
        prepared.model,
        prepared.train_set,
        prepared.val_set,
        spec.train,
        run_dir=spec.run_dir,
        teacher=prepared.teacher,
        resume=resume,
        progress=progress,
        on_epoch=on_epoch,
        model_config=dict(
            prepared.model_config,
            spec=_plain(asdict(spec)),
            teacher=teacher_identity(spec),
            init=init_identity(spec),
            classes=list(prepared.train_set.classes),  # so an export names them wherever it runs
        ),
    )


def teacher_identity(spec: RunSpec) -> str | None:
    """What the run's teacher is, beyond its path: the store's manifest, hashed, or the teacher
    checkpoint's `checkpoint_identity`, so that a run distilled from an older store or teacher is not
    mistaken for a current one."""
    if spec.logits_path:
        return file_sha256(Path(spec.logits_path) / "manifest.json")
    return checkpoint_identity(spec.teacher_checkpoint)


def autocast_identity(spec: RunSpec) -> str | None:
    """How a run of `spec` trains on this machine: the dtype it autocasts to ("bfloat16",
    "float16"), or "float32" without autocast. A row carries how its run trained (`autocast`), so
    that a clone on a CPU without native bf16, which trains in fp32, can say which of the rows it
    reused were trained in bf16 elsewhere (`ResultsLog.reuse_note`). None where the spec's device
    is not on this machine (or not a device: training the spec says so)."""
    try:
        device = pick_device(spec.train.device)
    except ValueError:
        return None
    dtype = training_autocast(spec.train, device)
    return str(dtype or torch.float32).removeprefix("torch.")


def init_identity(spec: RunSpec) -> str | None:
    """The `checkpoint_identity` of the weights a fine-tuning run starts from (None: none), so that a
    run fine-tuned from an older pretraining is not mistaken for a current one."""
    return checkpoint_identity(spec.init_from)


def file_sha256(path: str | Path | None) -> str | None:
    """The sha256 of a file's bytes; None when there is no path or no such file."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_identity(path: str | Path | None) -> str | None:
    """What a weights file holds, beyond its path: for a checkpoint written by `run` (its "model" and
    "model_config"), the hash of its weights (`run_digest`'s: a results row of the run that wrote
    it names the same weights), so that weights trained again bit for bit in another clone keep their
    identity although the file also records wall times; for any other file (released or third-party
    weights), the sha256 of its bytes. None when there is no path or no such file."""
    if not path or not Path(path).is_file():
        return None
    if Path(path).suffix == ".safetensors":  # weights only, no history: its bytes are its identity
        return file_sha256(path)
    try:
        checkpoint = load_checkpoint(path)
    except ValueError:  # not a torch checkpoint: its bytes are its identity
        return file_sha256(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict) and "model_config" in checkpoint:
        return _weights_digest(checkpoint["model"])
    return file_sha256(path)


def run_or_reuse(spec: RunSpec, *, force: bool = False, progress: bool = True, on_epoch=None) -> TrainResult:
    """Train `spec`, unless its folder already holds a finished run of exactly this spec (then read
    its history back), or an interrupted one (then resume it). `force=True` always retrains.
    Notebooks call this, so re-running them costs nothing and a killed sweep loses nothing."""
    last = spec.run_dir / "last.pt"
    if last.is_file() and not force:
        ckpt = load_checkpoint(last)
        same = isinstance(ckpt, dict) and not run_differences(spec, ckpt)
        if same and ckpt["epoch"] >= spec.train.epochs:
            return TrainResult(
                run_dir=spec.run_dir, history=list(ckpt["history"]), best_top1=ckpt["best_top1"], reused=True
            )
        if same:
            return run(spec, resume=True, progress=progress, on_epoch=on_epoch)
    return run(spec, progress=progress, on_epoch=on_epoch)


def run_differences(spec: RunSpec, checkpoint: dict) -> list[str]:
    """What differs between `spec` and the run saved in `checkpoint` (written by `run`): one
    "field: run X, asked Y" line per field of the data, model, optimisation or teacher (the teacher
    by content: `teacher_identity`); empty when the checkpoint is a run of exactly this spec. Where
    the run, its store and its teacher's checkpoint live is not compared (see `_movable_run`)."""
    saved = checkpoint.get("model_config") if isinstance(checkpoint.get("model_config"), dict) else {}
    config = saved_config(checkpoint.get("config") or {})
    ran = _flat(config, saved.get("spec") or {}, saved.get("teacher"), saved.get("init"))
    asked = _flat(asdict(spec.train), _plain(asdict(spec)), teacher_identity(spec), init_identity(spec))
    return [
        f"{key}: run {ran.get(key)!r}, asked {asked.get(key)!r}"
        for key in sorted(ran.keys() | asked.keys())
        if ran.get(key) != asked.get(key)
    ]


def _flat(train: dict, spec: dict, teacher: str | None, init: str | None) -> dict:
    """One level of "section.field" keys: the training config, the data spec and the rest of the run
    spec. Without a teacher, alpha and temperature play no part in what a run is."""
    data_fields = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    flat = {f"train.{k}": v for k, v in train.items()}
    if not ((spec.get("teacher_model") or spec.get("logits_path")) and train.get("alpha", 0) > 0):
        flat.update({"train.alpha": None, "train.temperature": None})
    flat.update({f"data.{k}": v for k, v in _movable_data(data_fields).items()})
    flat.update({k: v for k, v in _movable_run(spec).items() if k != "data"})
    return dict(flat, **{"teacher (content hash)": teacher, "init_from (content hash)": init})


def refuse_if_running(spec: RunSpec) -> None:
    """Fail fast, before data is loaded or a model built, when another process is training this run
    (its folder's lock is held); `trainer.train` takes the lock itself for the whole run.

    Raises:
        LockHeld: the run folder's lock is held (the message names the holder).
    """
    if spec.run_dir.is_dir() and os.environ.get("RANK", "0") == "0":  # one probe: the ranks' could collide
        FileLock(spec.run_dir / ".lock", what=f"run {spec.run_dir}").acquire().release()


def check_resumable(spec: RunSpec) -> dict:
    """Check, before anything is loaded or written, that `spec.run_dir/last.pt` continues this spec;
    returns the checkpoint.

    Raises:
        LockHeld: another process is training this run.
        FileNotFoundError: no checkpoint to resume from.
        ValueError: the checkpoint cannot be read, or was saved by a run with other data, model,
            optimisation or teacher (every differing field is listed).
    """
    refuse_if_running(spec)
    last = spec.run_dir / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {last}")
    checkpoint = load_checkpoint(last)
    differences = run_differences(spec, checkpoint) if isinstance(checkpoint, dict) else ["not a run's checkpoint"]
    if differences:
        longer = any(d.startswith("train.epochs:") for d in differences)
        hint = "; to train on from its weights, start a new run with --init-from it" if longer else ""
        raise ValueError(f"cannot resume {last}: it is a run of another spec ({'; '.join(differences)}){hint}")
    return checkpoint


def run_history(spec: RunSpec) -> list[dict]:
    """A run's per-epoch records (its log.jsonl), e.g. to plot a reused run's curves.

    Raises:
        FileNotFoundError: the run has no log.
    """
    log = spec.run_dir / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"run {spec.name!r} has no log at {log}")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_digest(run_dir: str | Path, checkpoint: str = "last.pt") -> str:
    """A hash of a run's weights (in `checkpoint`): a result logged with it belongs to exactly these
    weights, so a run that was retrained, or a result file from another clone, is told apart.

    Raises:
        FileNotFoundError, ValueError: no readable checkpoint (see `load_checkpoint`).
    """
    return _weights_digest(load_checkpoint(Path(run_dir) / checkpoint)["model"])


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    return weights_sha256(state)[:16]


def _plain(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "train"}


def _movable_run(spec: dict) -> dict:
    """A run spec without the places it lives: the run folder is where its checkpoint was found, and
    the store or teacher checkpoint is compared by content (`teacher_identity`), so a project folder
    that was moved or cloned with its runs still reuses them."""
    where = {
        "output_dir": None,
        "logits_path": bool(spec.get("logits_path")),
        "teacher_checkpoint": bool(spec.get("teacher_checkpoint")),
        "init_from": bool(spec.get("init_from")),
    }
    return {**spec, **where}


def _movable_data(data_spec: dict) -> dict:
    """A data spec without how its files were checked, which is not part of what a run is, and with
    a data folder inside the project named relative to it (notebook 06's image folder under build/),
    so that a fresh clone or a moved project is the same run."""
    root = data_spec.get("root")
    if root and Path(root).resolve().is_relative_to(project_root()):
        root = Path(root).resolve().relative_to(project_root()).as_posix()
    elif root:
        root = os.path.normpath(root)  # one spelling per folder, as DataSpec keeps it (runs saved before it did)
    return {**data_spec, "root": root, "verify_files": None, "check_images": None}


def load_trained(path: str | Path) -> nn.Module:
    """Rebuild a model from a checkpoint written by `run` (architecture from its model_config), in
    eval mode and channels-last memory (what evaluation and a teacher run fastest in).

    Raises:
        FileNotFoundError, ValueError: the checkpoint is missing, unreadable or has no model_config.
    """
    ckpt = load_checkpoint(path)
    config = ckpt.get("model_config") or {}
    if "name" not in config:
        raise ValueError(f"{path} does not say which model it holds (no model_config)")
    model = build_model(
        config["name"], num_classes=config["num_classes"], in_chans=config["in_chans"], img_size=config["img_size"]
    )
    return load_weights(model, path).eval().to(memory_format=torch.channels_last)  # faster convolutions


def evaluate_run(
    run_dir: str | Path, test_set: DatasetWithIDs, *, checkpoint: str = "last.pt", amp: bool | None = None
) -> dict:
    """Evaluate a finished run's model (by default its final weights) on a test set: top-1, top-5, loss.
    `amp`: as `evaluate` (None: the inference policy, bf16 where the machine has it natively)."""
    return evaluate(load_trained(Path(run_dir) / checkpoint), test_set, amp=amp)


class ResultsLog:
    """A JSON-lines file of finished results, one row per key, appended as each run ends, so an
    interrupted sweep keeps what it finished and a re-run skips it. A last line cut off mid-append
    (a crash, a full disk) is dropped with a warning; the next `add` rewrites the file whole.

    Raises:
        ValueError: a line other than the last is not JSON, or a line without a key (the file and line
            are named)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        self.reused: list[str] = []  # keys `sweep_point` took from the file without their runs on disk
        self.kept: list[str] = []  # keys whose runs `sweep_point` found finished on disk (not retrained)
        self.reused_elsewhere: dict[str, tuple] = {}  # of those, trained in another precision: (theirs, here)
        self.cut = False  # the file ends in a cut-off line: the next add rewrites it whole
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    if number < len(lines):
                        raise ValueError(f"{self.path}, line {number}, is not a results row: {error}") from error
                    warnings.warn(  # a crash or a full disk mid-append: the row is measured again
                        f"{self.path}: its last line was cut off ({error}); it is dropped", stacklevel=2
                    )
                    self.cut = True
                    continue
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError(f"{self.path}, line {number}, is not a results row: it has no key")
                self.rows[row["key"]] = row

    def reuse_note(self) -> str | None:
        """One line on what `sweep_point` did not train (None: it trained every run it was asked
        for): the runs it found finished on disk, the rows it reused without their runs, and how many
        of those were trained in another precision than this machine trains in."""
        parts = []
        if self.kept:
            parts.append(f"{len(self.kept)} run(s) found finished on disk, not retrained (their times are from then)")
        if self.reused:
            parts.append(self._reused_note())
        return "; ".join(parts) or None

    def _reused_note(self) -> str:
        note = f"{len(self.reused)} run(s) not on disk: their rows in {self.path.name} were reused, nothing retrained"
        if self.reused_elsewhere:
            counts = Counter(theirs for theirs, _ in self.reused_elsewhere.values())
            here = next(iter(self.reused_elsewhere.values()))[1]
            named = sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or ""))  # unrecorded last
            how = ", ".join(f"{n} in {theirs or 'an unrecorded precision'}" for theirs, n in named)
            note += f"; of them, trained elsewhere {how}, where this machine trains in {here} (force=True retrains)"
        return note

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, key: str, row: dict) -> dict:
        """Log `row` under `key`: appended, or, when the key was logged before, the file rewritten
        (atomically) with the new row in the old one's place. An append that fails (a full disk) may
        leave part of a line: the next `add` then rewrites the file whole.

        Raises:
            OSError: the file could not be written (the row is kept in `rows`)."""
        row = dict(row, key=key)
        replacing = key in self.rows
        self.rows[key] = row
        if replacing or self.cut:
            self._rewrite()
            self.cut = False
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError:
                self.cut = True
                raise
        return row

    def retain(self, keys: list[str]) -> None:
        """Keep only the rows of `keys` (a finished sweep's points), dropping rows of points the sweep
        no longer has, e.g. a top-k ablation around a best (T, alpha) that has since moved."""
        self.rows = {key: self.rows[key] for key in keys if key in self.rows}
        self._rewrite()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))


def measure(spec: RunSpec, *, test: bool = False, checkpoint: str = "last.pt") -> dict:
    """A run's weights (by default its latest, last.pt: its final ones once it has finished) on its
    whole validation set (val_top1, val_top5) and, with `test`, on the test set (test_top1,
    test_top5; see `test_set` for when that is refused).

    Raises:
        ValueError, FileNotFoundError: no such checkpoint in the run folder, or as `validation_set`
            and `test_set`.
    """
    sets = {"val": _cached_set(validation_set, spec)}
    if test:
        sets["test"] = _cached_set(test_set, spec)
    model = load_trained(spec.run_dir / checkpoint)
    numbers = {}
    for split, dataset in sets.items():
        metrics = evaluate(model, dataset)
        numbers.update({f"{split}_top1": round(metrics["top1"], 2), f"{split}_top5": round(metrics["top5"], 2)})
    return numbers


_SETS: dict[tuple, DatasetWithIDs] = {}


def _cached_set(build, spec: RunSpec) -> DatasetWithIDs:
    """`build(spec)` (validation_set or test_set), built once per data description in a process."""
    key = (build.__name__, spec.data.dataset, spec.data.root, spec.data.img_size, spec.data.val_per_class)
    if key not in _SETS:
        _SETS[key] = build(spec)
    return _SETS[key]


def spec_digest(spec: RunSpec) -> str:
    """A hash of what a run is, from its spec alone: the data, model, optimisation and where its
    teacher's targets come from, without where things live and without the content of the store or
    checkpoints it reads (`run_differences` compares those when they are on disk). A results row
    carries it, so a row can stand for its run in a clone that has the results but not the runs."""
    flat = _flat(asdict(spec.train), _plain(asdict(spec)), None, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable_row(results: ResultsLog, key: str, spec: RunSpec, *, test: bool = False) -> dict | None:
    """The row logged under `key` if it stands for `spec` without its run: it was made from the same
    spec (`spec_digest`), holds test numbers if `test` asks for them, the run is not on disk (a run
    on disk is checked by its weights instead, in `sweep_point`), the store or checkpoints the run
    read, where they are on disk, are the ones it was made from. None otherwise. A row trained in
    another precision than a run of `spec` would train in here (`autocast_identity`) is reused all
    the same, so that a clone can redraw the course's figures on any CPU; `sweep_point` notes it."""
    row = results.rows.get(key)
    if row is None or row.get("spec_digest") != spec_digest(spec) or (test and row.get("test_top1") is None):
        return None
    if (spec.run_dir / "last.pt").is_file():
        return None
    for mine, field_name in ((teacher_identity(spec), "teacher_identity"), (init_identity(spec), "init_identity")):
        if mine is not None and mine != row.get(field_name):
            return None
    return row


def _compact_history(history: list[dict]) -> list[dict]:
    """The epochs of a run that were validated (all of them for a run without validation), with the
    numbers the course's curves draw, rounded: what a results row keeps of a run's log."""
    validated = [r for r in history if "top1" in r] or history
    keep = ("epoch", "step", "train_loss", "val_loss", "top1")
    return [{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep if k in r} for r in validated]


def sweep_point(
    results: ResultsLog,
    key: str,
    spec: RunSpec,
    *,
    test: bool = False,
    force: bool = False,
    checkpoint: str = "last.pt",
    **fields,
) -> dict:
    """One run of an experiment: train `spec` (or reuse its finished run, see `run_or_reuse`; `force`
    retrains), measure its `checkpoint` on validation (and, with `test`, on the test set: `measure`)
    and log the row under `key` in `results` as soon as it ends.

    A logged row names the weights it was measured on (`run_digest`): while its run is on disk it is
    returned as it is only if those weights are the run's (and it holds test numbers if `test` asks
    for them); a row whose run was retrained is measured again and replaced. A row whose run is not
    on disk (a fresh clone with the committed results) stands for it if `reusable_row` says so; its
    key is then added to `results.reused`, and nothing is trained. The row holds `fields` (the
    point's coordinates, e.g. condition="distilled", seed=0, alpha=0.5; a reused row lacking one
    gains it), val_top1/val_top5,
    test_top1/test_top5 (None unless `test`), the training seconds, the run name, the digests and the
    validated epochs (`history`); a new row is printed.

    Raises:
        ValueError, FileNotFoundError: the run cannot be prepared, trained or measured (see
            `prepare_run`, `run`, `measure`).
    """
    if not force and (row := reusable_row(results, key, spec, test=test)) is not None:
        results.reused.append(key)
        if (here := autocast_identity(spec)) is not None and row.get("autocast") != here:
            results.reused_elsewhere[key] = (row.get("autocast"), here)
        return _with_fields(results, key, row, fields)
    result = run_or_reuse(spec, force=force, progress=False)
    if result.reused:
        results.kept.append(key)
    digest = run_digest(spec.run_dir, checkpoint)
    identity = dict(
        spec_digest=spec_digest(spec),
        teacher_identity=teacher_identity(spec),
        init_identity=init_identity(spec),
        autocast=_trained_autocast(spec.run_dir),
        history=_compact_history(result.history),
    )
    old = results.rows.get(key, {})
    if old.get("run_digest") == digest and (not test or old.get("test_top1") is not None):
        if all(old.get(k) == v for k, v in identity.items()):
            return _with_fields(results, key, old, fields)
        return results.add(key, dict(old, **identity, **{k: v for k, v in fields.items() if k not in old}))
    row = dict(fields, test_top1=None, test_top5=None)  # the test set is read only when `test` asks
    row.update(measure(spec, test=test, checkpoint=checkpoint))
    row.update(seconds=round(sum(r["epoch_time_s"] for r in result.history), 1), run=spec.name, run_digest=digest)
    print(row_line(key, row))
    return results.add(key, dict(row, **identity))


def _with_fields(results: ResultsLog, key: str, row: dict, fields: dict) -> dict:
    """`row` as logged, or, if it lacks some of the point's `fields` (a row logged before a field
    was recorded), with them added and the row logged again."""
    missing = {k: v for k, v in fields.items() if k not in row}
    return results.add(key, dict(row, **missing)) if missing else row


def row_line(key: str, row: dict) -> str:
    """One readable line for a results row: its key, validation and (where read) test top-1 and
    top-5, the training seconds and the run, e.g. "labels only/seed=0: val top-1 74.05 (top-5 97.90),
    test top-1 74.18 (top-5 97.81); trained 15.2 s (run tinyvit_5m_baseline_s0)"."""
    line = f"{key}: val top-1 {row['val_top1']:.2f} (top-5 {row['val_top5']:.2f})"
    if row.get("test_top1") is not None:
        line += f", test top-1 {row['test_top1']:.2f} (top-5 {row['test_top5']:.2f})"
    return line + f"; trained {row['seconds']:.1f} s (run {row['run']})"


def _trained_autocast(run_dir: Path) -> str | None:
    """How the run in `run_dir` trained, from its config.json: as `autocast_identity` says it (None:
    a run written before its config recorded the policy)."""
    policy = json.loads((run_dir / "config.json").read_text()).get("policy", {})
    return (policy.get("autocast") or "float32") if "autocast" in policy else None


def choose_on_validation(rows: list[dict], metric: str = "val_top1") -> dict:
    """The row with the highest validation `metric` (the first such row on a tie): how every "best"
    of the course is chosen. Test numbers play no part.

    Raises:
        ValueError: no rows, a metric that is not a validation number, or a row without it.
    """
    if not metric.startswith("val_"):
        raise ValueError(f"choose on validation numbers, not {metric!r}")
    if not rows or any(metric not in row for row in rows):
        raise ValueError(f"every row needs {metric!r} to choose on (rows: {[row.get('key') for row in rows]})")
    return max(rows, key=lambda row: row[metric])
