"""Execute the course's notebooks in order with papermill: what `make run-all` runs.

    python scripts/run_notebooks.py --profile default --kernel tinyvit --out build/executed notebooks/0*.ipynb

With `--publish DIR`, each executed notebook of the default profile is also copied to DIR (the
repository's `executed/`, which a code host shows with its outputs and figures); a notebook that
fails keeps its previous copy there. A profile that names its notebooks (`Profile.notebooks`: the
long one runs 02 and 04) runs only those; a profile other than the default writes its executed
copies to a subfolder of `--out` named after it. Each executed copy is also written as HTML beside
it (same stem, `.html`), as `jupyter nbconvert --to html` would, so a reader sees the outputs in a
browser without Jupyter.

Prints one line per notebook: its name, its wall time and where its executed copy went; on an error,
the notebook, the cell's error and the executed copy (which shows the failing cell), then exit 1.
A failed HTML export is one more line on stderr, after an execution error and never instead of
it; with every notebook run, it also ends in exit 1.
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
from nbconvert import HTMLExporter

from tinyvit_lib.profiles import PROFILES
from tinyvit_lib.utils import atomic_write_text


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels listen on IPC sockets, files in Jupyter's runtime folder (by
    default jupyter_client would put them in the current folder, the repository)."""

    def __init__(self, **kwargs) -> None:
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        super().__init__(transport="ipc", ip=str(runtime / f"kernel-{uuid.uuid4().hex[:12]}-ipc"), **kwargs)

    async def _async_interrupt_kernel(self) -> None:
        """Interrupt the kernel, except while shutting it down: jupyter_client's shutdown sends SIGINT
        first, and an idle ipykernel then logs "ERROR | KeyboardInterrupt caught in kernel" although
        nothing went wrong. papermill shuts the kernel down only after the last cell, so there is
        nothing to interrupt then."""
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


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


def export_html(executed: Path) -> Path:
    """Write the notebook `executed` as HTML beside it (same stem, `.html`); returns the HTML's path.

    Raises:
        OSError: `executed` cannot be read or the HTML cannot be written.
        nbformat.reader.NotJSONError, jinja2.TemplateNotFound, ...: whatever nbconvert raises for a
            file it cannot read as a notebook or a template it cannot find.
    """
    body, _ = HTMLExporter().from_filename(str(executed))
    return atomic_write_text(executed.with_suffix(".html"), body)


def try_export_html(executed: Path) -> Path | None:
    """`export_html`, a failure reported as one line on stderr and None: the executed copy is the
    record, its HTML a convenience that must not hide what the execution said."""
    try:
        return export_html(executed)
    except Exception as exc:  # nbconvert, nbformat, jinja2 and the disk each raise their own types
        print(f"{executed.name}: no HTML written ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def minutes(seconds: float) -> str:
    """'3 min 07 s'."""
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--profile", default="default")
    p.add_argument("--kernel", default="tinyvit")
    p.add_argument("--out", type=Path, default=Path("build/executed"))
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="default profile only: also copy each executed notebook here (a tracked folder a code host shows)",
    )
    args = p.parse_args(argv)
    if args.profile not in PROFILES:
        p.error(f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
    chosen = PROFILES[args.profile].notebooks  # None: every notebook
    notebooks = [nb for nb in args.notebooks if chosen is None or nb.name[:2] in chosen]
    if args.profile != "default":  # each profile's executed copies in their own folder
        args.out = args.out / args.profile
    args.out.mkdir(parents=True, exist_ok=True)
    skipped = f" (the profile runs {', '.join(chosen)} only)" if len(notebooks) < len(args.notebooks) else ""
    print(f"profile {args.profile}: {len(notebooks)} notebook(s){skipped}, executed copies in {args.out}/", flush=True)
    total, no_html = 0.0, []
    for notebook in notebooks:
        executed = args.out / notebook.name
        try:
            seconds = run(notebook, args.out, kernel=args.kernel, profile=args.profile)
        except papermill.PapermillExecutionError as exc:
            print(
                f"{notebook.name}: failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n  see {executed}",
                file=sys.stderr,
                flush=True,
            )
            try_export_html(executed)  # the failing cell, readable in a browser too
            return 1
        total += seconds
        html = try_export_html(executed)
        if html is None:
            no_html.append(notebook.name)
        if args.publish is not None and args.profile == "default":
            args.publish.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.publish / notebook.name, executed.read_text())
        print(f"{notebook.name:<36} {minutes(seconds):>12}  -> {executed}{' (+ .html)' if html else ''}", flush=True)
    print(f"all {len(notebooks)} notebook(s) in {minutes(total)}")
    if no_html:
        print(f"no HTML for {len(no_html)} notebook(s): {', '.join(no_html)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
