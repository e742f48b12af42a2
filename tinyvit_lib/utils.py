"""Plumbing that every other module shares, each piece written once: atomic file writes, checkpoint
reading with one error policy, a lock that gives one writer at a time, the process group (rank and
world size under `torchrun`), the machine facts the speed policy reads, and progress bars.

This is the bottom floor of the package: it imports nothing from `tinyvit_lib`.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import ctypes
import ctypes.util
import fcntl
import io
import numbers
import os
import pickle
import socket
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

__all__ = [
    "FileLock",
    "check_integer",
    "is_integer",
    "LockHeld",
    "autocast_by_default",
    "cpu_has_native_bf16",
    "keep_freed_memory",
    "all_reduce_sum",
    "atomic_write",
    "atomic_write_text",
    "check_writable_folder",
    "init_distributed",
    "is_main_process",
    "progress",
    "rank_world",
    "load_checkpoint",
    "save_checkpoint",
    "project_root",
]

# What torch.load raises on a file that is not a checkpoint it may read: truncated or not a zip
# archive (RuntimeError, BadZipFile), empty (EOFError), some other file (UnpicklingError, KeyError,
# IndexError, UnicodeDecodeError), or an object that needs code to rebuild (UnpicklingError under
# weights_only).
_NOT_A_CHECKPOINT = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    KeyError,
    IndexError,
    ValueError,
    zipfile.BadZipFile,
)


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `write(file)` into a temporary file in the same folder, flush and fsync
    it, then rename it over `path`: a kill at any moment leaves either the old file or the new one.

    The folder is created if needed. If `write` (or the disk) fails, the temporary file is removed
    and the exception propagates (an OSError then names `path`); `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` for text (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_writable_folder(path: str | Path, *, what: str) -> None:
    """Check, writing nothing, that folder `path` exists or can be created, and can be written in.

    Raises:
        ValueError: `path`, or the nearest of its parents that exists, is a file, or is on a
            read-only file system or not writable by this user (the message names `what` and both paths).
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: {existing} is read-only (file system or permissions)")


def project_root() -> Path:
    """The repository folder (the parent of the installed `tinyvit_lib` package)."""
    return Path(__file__).resolve().parent.parent


def save_checkpoint(obj: dict, path: str | Path, *more: str | Path) -> Path:
    """`torch.save(obj)` to `path` (and to each of `more`), atomically (see `atomic_write`).

    The checkpoint is serialised in memory once, then written: torch.save streaming into a file that
    hits a full disk reports a confusing RuntimeError, while a plain write raises OSError (ENOSPC)
    naming the cause. Returns `path`.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    for target in (path, *more):
        atomic_write(target, lambda f: f.write(data))
    return Path(path)


def load_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain values only, never code.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a checkpoint that can be read safely (truncated, empty, another
            kind of file, or pickled objects that need code to rebuild); the message names the file.
            Other errors (permissions, memory) propagate as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _NOT_A_CHECKPOINT as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


class LockHeld(RuntimeError):
    """Another live process holds the lock (the message names its PID and host)."""


class FileLock:
    """An exclusive lock on the file `path` for one writer at a time (a store, a run folder).

    The lock is `fcntl.flock` on the file, which the operating system releases when the holder exits
    or dies: a lock file left by a killed process is simply taken over, never mistaken for a live
    one. The holder writes its PID and host into the file, so a second process is told who holds
    it. The file stays in place after release (a logit store's writer removes its own once the store
    is complete, see `logit_store.StoreWriter`). `flock` protects processes on one machine; several
    machines writing one network folder are not protected (see docs/cli.md, "One writer at a time").

        with FileLock(run_dir / ".lock", what=f"run {run_dir}"):
            ...

    Raises (from `acquire`):
        LockHeld: another process holds the lock.
    """

    def __init__(self, path: str | Path, *, what: str) -> None:
        self.path, self.what = Path(path), what
        self._file: IO[str] | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # stays open while the lock is held
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise LockHeld(f"{self.what} is in use by {holder}: wait for it to finish, or stop it") from None
        except BaseException:
            file.close()
            raise
        try:
            file.seek(0)
            file.truncate()
            file.write(f"process {os.getpid()} on host {socket.gethostname()}\n")
            file.flush()
        except BaseException:
            file.close()  # closing the file releases the lock
            raise
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- processes


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with every option's default: also for options without help text, never twice (a help
    text that names its default keeps its own words), and not for flags or defaults of None."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints nothing for an empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "(default" in text:
            return text
        return f"{text} (default: %(default)s)"

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        quiet = action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS
        return bool(action.option_strings) and not quiet  # 0 is a default worth showing, False a flag's


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and when there is no process group): the process that writes shared files."""
    return rank_world()[0] == 0


def init_distributed(device: torch.device) -> None:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE > 1); a no-op
    when running alone or when the group exists. NCCL for CUDA devices, one process each; gloo
    otherwise, and where processes share a GPU (NCCL refuses two ranks on one device). A group it
    creates is left at the process's exit (`atexit`): a gloo group still running its threads when
    the interpreter tears down can abort the process ("terminate called without an active exception")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":  # collectives (NCCL's barrier too) use the current GPU: make it this process's
            torch.cuda.set_device(device)
        one_gpu_each = (
            device.type == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", world)) <= torch.cuda.device_count()
        )
        dist.init_process_group(backend="nccl" if one_gpu_each else "gloo")
        atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """Destroy this process's group, if it still exists (registered by `init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over every process (the values themselves when alone)."""
    if rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- the machine, for the speed policy


def cpu_has_native_bf16() -> bool:
    """Whether this process computes in bf16 natively: the CPU has AVX512-BF16 or AMX-BF16, and
    PyTorch's kernels may use AVX-512 (not capped by ATEN_CPU_CAPABILITY, as when an AVX2-only CPU is
    emulated) and so may oneDNN's (not capped by ONEDNN_MAX_CPU_ISA). Elsewhere oneDNN emulates bf16,
    which makes bf16 autocast several times slower than fp32."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    has_bf16 = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    capped = torch.backends.cpu.get_cpu_capability() != "AVX512"
    capped = capped or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16
    return has_bf16 and not capped


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 instructions (AVX512_CORE_BF16)
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def autocast_by_default(device: torch.device) -> bool:
    """Whether training and evaluation on `device` autocast unless told otherwise (`amp=None`): on
    CUDA, and on a CPU that computes bf16 natively, where bf16 pays for training and inference
    (docs/performance.md) once the depthwise convolutions whose bf16 backward oneDNN runs slowly
    stay in fp32 (`model.ConvBN`). Never on a CPU that emulates bf16, MPS or others."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def is_integer(value) -> bool:
    """An integer (Python's or NumPy's), and not a bool nor a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, *, low: int | None = None) -> None:
    """Raises ValueError naming `name` and `value`: not an integer (`is_integer`), or below `low`."""
    if not is_integer(value):
        raise ValueError(f"{name}={value!r} must be an integer")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing large blocks back to the OS.

    By default every block over 32 MB is mapped on allocation and unmapped on release, and the heap
    is trimmed when its free top grows past a threshold, so large activations are paid for again in
    page faults every step (at 224x224 and batch 32, TinyViT-5M's first stage makes such blocks);
    with this setting nothing is mapped apart and the heap is trimmed only past 2 GB of free top, so
    freed blocks are reused, as a caching allocator does on a GPU.
    Process-wide; the process keeps its peak memory until it ends. Returns False where glibc is absent.
    """
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # the value is a C int: larger ones would wrap
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# ----------------------------------------------------------------------------- progress


def progress(
    iterable: Iterable, *, total: int, desc: str, unit: str = "batch", initial: int = 0, enabled: bool = True
) -> Iterable:
    """A tqdm bar over `iterable` on the main process (tqdm.auto: a widget in Jupyter), or the
    iterable itself when `enabled` is False, on other ranks, or with TQDM_DISABLE set (read here:
    tqdm's notebook bar passes `disable` itself, so tqdm would not read it, and a headless notebook
    run would keep an empty bar in its outputs)."""
    if not enabled or not is_main_process() or os.environ.get("TQDM_DISABLE", "0").lower() not in ("", "0", "false"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False)
