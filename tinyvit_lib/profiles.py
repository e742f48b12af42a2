"""Run profiles of the course: one table of settings shared by every notebook.

A notebook's `parameters` cell names a profile (papermill: `-p profile fast`); the environment
variable TINYVIT_FAST=1 (set by `make test`) selects the fast profile, which runs every code path
on tiny data in seconds. Notebook-specific values live here too, so no literal is scattered.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROFILES", "resolve_profile", "project_root"]

PROFILES: dict[str, dict] = {
    # Tests: every code path, tiny sizes, synthetic data; figures go to build/, not figures/.
    "fast": dict(
        dataset="synthetic", img_size=32, in_chans=1, bias_demo_steps=5, bias_demo_batch=16,
        figures_dir="build/fast/figures",
    ),
    # `make run-all` on a laptop CPU: Fashion-MNIST at 32x32, one channel.
    "default": dict(
        dataset="fashion-mnist", img_size=32, in_chans=1, bias_demo_steps=300, bias_demo_batch=128,
        figures_dir="figures",
    ),
}


def project_root() -> Path:
    """The repository folder (the parent of the installed `tinyvit_lib` package)."""
    return Path(__file__).resolve().parent.parent


def resolve_profile(name: str) -> dict:
    """The settings of profile `name`, or of "fast" when TINYVIT_FAST=1; paths made absolute.

    Raises:
        ValueError: `name` is not a known profile.
    """
    if os.environ.get("TINYVIT_FAST") == "1":
        name = "fast"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    settings = dict(PROFILES[name], profile=name)
    settings["figures_dir"] = project_root() / settings["figures_dir"]
    return settings
