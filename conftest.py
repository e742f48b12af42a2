"""Test-session settings shared by tests/ and the notebooks.

`make test` shares the work among pytest-xdist workers with a scheduler of its own: the notebooks
are one unit of work, so one worker runs them in order (01 to 06, each cell after the one before,
as a reader would, and each notebook after the one whose results it reads), while each test module
is a unit for whichever worker is free. (xdist's own `--dist loadgroup` cannot do this here: it
groups by renaming node IDs, which pytest 9 no longer reads.)
"""

import pytest


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called only where it runs the session
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksInOrder(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "notebooks" if path.endswith(".ipynb") else super()._split_scope(nodeid)

    return NotebooksInOrder(config, log)
