"""`scripts/run_notebooks.py` (what `make run-all` runs) writes each executed notebook as HTML beside
its executed copy, and a failed export never hides a notebook's own failure."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "run_notebooks.py"
KERNEL = "python3"  # this environment's interpreter (jupyter_client maps the native spec's "python" to it)


@pytest.fixture(scope="module")
def script():
    """The script, imported as a module."""
    spec = importlib.util.spec_from_file_location("run_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook(path: Path, *cells: str) -> Path:
    """A throwaway notebook of code `cells` at `path`, on the Python kernel as the course's are."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata.kernelspec = dict(name=KERNEL, language="python", display_name="Python 3")
    nbformat.write(nb, path)
    return path


def broken_export(executed: Path) -> Path:
    """Stands in for `export_html` on a full disk."""
    raise OSError(f"cannot write {executed.with_suffix('.html')}")


def test_each_executed_notebook_gets_its_html_with_the_outputs(script, tmp_path, capsys):
    ok = notebook(tmp_path / "01_ok.ipynb", "answer = 6 * 7", "print(f'the answer is {answer}')")
    failing = notebook(tmp_path / "02_failing.ipynb", "raise ValueError('no such dataset: xyz')")
    status = script.main([str(ok), str(failing), "--kernel", KERNEL, "--out", str(tmp_path), "--profile", "fast"])
    out = tmp_path / "fast"  # a profile other than the default: its own folder
    assert status == 1  # the second notebook failed
    assert (out / "01_ok.ipynb").exists()
    assert "the answer is 42" in (out / "01_ok.html").read_text()
    assert "no such dataset: xyz" in (out / "02_failing.html").read_text()  # the failing cell, in a browser
    err = capsys.readouterr().err
    assert "02_failing.ipynb: failed in cell 2: ValueError: no such dataset: xyz" in err  # 1: the parameters


def test_a_failed_export_does_not_hide_the_execution_failure(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(script, "export_html", broken_export)
    failing = notebook(tmp_path / "failing.ipynb", "raise ValueError('no such dataset: xyz')")
    status = script.main([str(failing), "--kernel", KERNEL, "--out", str(tmp_path / "executed")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.index("ValueError: no such dataset: xyz") < err.index("no HTML written (OSError")


def test_a_failed_export_after_a_good_run_is_reported_and_exits_1(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(script, "export_html", broken_export)
    ok = notebook(tmp_path / "ok.ipynb", "print('fine')")
    status = script.main([str(ok), "--kernel", KERNEL, "--out", str(tmp_path / "executed")])
    assert status == 1
    assert (tmp_path / "executed" / "ok.ipynb").exists()
    out, err = capsys.readouterr()
    assert "all 1 notebook(s) in" in out
    assert err.rstrip().endswith("no HTML for 1 notebook(s): ok.ipynb")


def test_a_file_nbconvert_cannot_read_is_reported_not_raised(script, tmp_path, capsys):
    not_a_notebook = tmp_path / "broken.ipynb"
    not_a_notebook.write_text("{ not json")
    assert script.try_export_html(not_a_notebook) is None
    assert "broken.ipynb: no HTML written" in capsys.readouterr().err
    assert not not_a_notebook.with_suffix(".html").exists()


def test_a_profile_runs_only_the_notebooks_it_names(script, tmp_path, capsys):
    books = [notebook(tmp_path / f"0{i}_nb.ipynb", f"print({i})") for i in (1, 2, 3, 4)]
    status = script.main([*map(str, books), "--kernel", KERNEL, "--out", str(tmp_path / "out"), "--profile", "long"])
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "out" / "long").glob("*.ipynb")) == ["02_nb.ipynb", "04_nb.ipynb"]
    assert "2 notebook(s) (the profile runs 02, 04 only)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main([str(books[0]), "--profile", "nope"])


def test_shutting_a_kernel_down_does_not_interrupt_it(script, monkeypatch):
    """jupyter_client's shutdown interrupts the kernel first; an idle ipykernel logs that SIGINT as
    "ERROR | KeyboardInterrupt caught in kernel", which a learner reads as a failure."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    sent = []

    async def interrupt(self) -> None:  # what jupyter_client would do: send the kernel SIGINT
        sent.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", interrupt)
    manager = script.IPCKernelManager(kernel_name=KERNEL)
    for shutting_down in (True, False):
        manager.shutting_down = shutting_down
        asyncio.run(manager._async_interrupt_kernel())
    assert sent == [False]  # only the interrupt outside a shutdown reached the kernel


def test_the_default_profile_publishes_its_executed_notebooks_and_others_do_not(script, tmp_path):
    book = notebook(tmp_path / "01_nb.ipynb", "print('published')")
    for profile, published in (("default", True), ("fast", False)):
        shown = tmp_path / f"shown-{profile}"
        args = [str(book), "--kernel", KERNEL, "--out", str(tmp_path / "out"), "--profile", profile]
        assert script.main([*args, "--publish", str(shown)]) == 0
        assert (shown / "01_nb.ipynb").exists() == published
    assert "published" in (tmp_path / "shown-default" / "01_nb.ipynb").read_text()  # with its outputs
