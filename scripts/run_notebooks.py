"""Execute the course's notebooks in order with papermill: what `make run-all` runs.

    python scripts/run_notebooks.py --profile default --kernel tinyvit --out build/executed notebooks/0*.ipynb

Prints one line per notebook: its name, its wall time and where its executed copy went; on an error,
the notebook, the cell's error and the executed copy (which shows the failing cell), then exit 1.
The kernel talks to papermill over local IPC sockets instead of TCP ports, so ipykernel has no
plain-text TCP connection to warn about.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import papermill
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels listen on IPC sockets, files in Jupyter's runtime folder (by
    default jupyter_client would put them in the current folder, the repository)."""

    def __init__(self, **kwargs) -> None:
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        super().__init__(transport="ipc", ip=str(runtime / f"kernel-{uuid.uuid4().hex[:12]}-ipc"), **kwargs)


def run(notebook: Path, out_dir: Path, *, kernel: str, profile: str) -> float:
    """Execute `notebook` into `out_dir` with the given profile; returns the wall time in seconds."""
    t0 = time.perf_counter()
    papermill.execute_notebook(
        str(notebook),
        str(out_dir / notebook.name),
        parameters=dict(profile=profile),
        kernel_name=kernel,
        progress_bar=False,
        kernel_manager_class=IPCKernelManager,
    )
    return time.perf_counter() - t0


def minutes(seconds: float) -> str:
    """'3 min 07 s'."""
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--profile", default="default")
    p.add_argument("--kernel", default="tinyvit")
    p.add_argument("--out", type=Path, default=Path("build/executed"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"profile {args.profile}: {len(args.notebooks)} notebook(s), executed copies in {args.out}/", flush=True)
    total = 0.0
    for notebook in args.notebooks:
        try:
            seconds = run(notebook, args.out, kernel=args.kernel, profile=args.profile)
        except papermill.PapermillExecutionError as exc:
            print(
                f"{notebook.name}: failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"  see {args.out / notebook.name}",
                file=sys.stderr,
            )
            return 1
        total += seconds
        print(f"{notebook.name:<36} {minutes(seconds):>12}  -> {args.out / notebook.name}", flush=True)
    print(f"all {len(args.notebooks)} notebook(s) in {minutes(total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
