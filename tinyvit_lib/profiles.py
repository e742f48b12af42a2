"""Run profiles of the course: one table of settings shared by every notebook.

A notebook's `parameters` cell names a profile (papermill: `-p profile fast`, or
`make run-all PROFILE=...`); the environment variable TINYVIT_FAST=1 (set by `make test`) selects
the fast profile, which runs every code path on tiny data in seconds. Every size, budget and
hyper-parameter of the notebooks lives here, so no literal is scattered across them.

The course's story in every profile: the teacher is trained on the whole training set (it stands
for a big pretrained model); each student gets a smaller budget (a per-class subset of the
training images) and learns either from the labels alone or also from the teacher.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .experiment import RunSpec
from .trainer import TrainConfig

__all__ = ["PROFILES", "resolve_profile", "project_root", "run_spec", "distillation_runs"]

# alpha = 1, T = 1 is the paper's recipe: the official code trains the student on the stored teacher
# probabilities alone (labels only feed the accuracy meters). Notebook 04 sweeps both.
_COMMON = dict(in_chans=3, augment="light", k=10, alpha=1.0, temperature=1.0, teacher_model="resnet18")

PROFILES: dict[str, dict] = {
    # `make test`: every code path on the synthetic dataset, in seconds. Never a result.
    "fast": dict(
        _COMMON, dataset="synthetic", data_root=None, img_size=32, out_dir="build/fast",
        figures_dir="build/fast/figures", k=5,
        bias_demo=dict(epochs=1, batch_size=32, lr=2e-3, max_per_class=8, max_val_per_class=4),
        teacher=dict(epochs=1, batch_size=64, lr=2e-3, max_per_class=40),
        student=dict(epochs=2, batch_size=32, lr=2e-3, max_per_class=12, max_val_per_class=8),
        seeds=(0,), replay_epochs=2,
        sweep=dict(temperatures=(1.0,), alphas=(0.5, 1.0), ks=(1, 5), variants=("tinyvit_5m", "tinyvit_11m"),
                   epochs=2),
    ),
    # `make run-all` on a laptop CPU: Fashion-MNIST at 32x32, grayscale.
    "default": dict(
        _COMMON, dataset="fashion-mnist", data_root=None, img_size=32, in_chans=1, out_dir=".",
        figures_dir="figures",
        bias_demo=dict(epochs=1, batch_size=128, lr=2e-3, max_per_class=1000, max_val_per_class=100),
        teacher=dict(epochs=2, batch_size=128, lr=2e-3, max_per_class=None),
        student=dict(epochs=4, batch_size=128, lr=2e-3, max_per_class=300, max_val_per_class=200),
        seeds=(0, 1, 2), replay_epochs=4,
        sweep=dict(temperatures=(1.0, 2.0, 4.0), alphas=(0.25, 0.5, 0.75, 1.0), ks=(1, 3, 5, 10),
                   variants=("tinyvit_5m", "tinyvit_11m", "tinyvit_21m"), epochs=4),
    ),
    # A GPU with CIFAR-100 in DATA_ROOT (or downloadable): 32x32 RGB, the whole training set.
    "cifar100": dict(
        _COMMON, dataset="cifar100", data_root=os.environ.get("DATA_ROOT"), img_size=32, out_dir=".",
        figures_dir="figures/cifar100",
        bias_demo=dict(epochs=5, batch_size=256, lr=2e-3, max_per_class=None, max_val_per_class=None),
        teacher=dict(epochs=60, batch_size=256, lr=2e-3, max_per_class=None),
        student=dict(epochs=100, batch_size=256, lr=2e-3, max_per_class=None, max_val_per_class=None),
        seeds=(0, 1), replay_epochs=100,
        sweep=dict(temperatures=(1.0, 2.0, 4.0), alphas=(0.25, 0.5, 0.75, 1.0), ks=(1, 3, 5, 10),
                   variants=("tinyvit_5m", "tinyvit_11m", "tinyvit_21m"), epochs=100),
    ),
    # A GPU with an ImageNet-1k tree in DATA_ROOT: the teacher sees everything, students 260 images per class.
    "imagenet-subset": dict(
        _COMMON, dataset="imagenet", data_root=os.environ.get("DATA_ROOT"), img_size=224, out_dir=".",
        figures_dir="figures/imagenet-subset", teacher_model="resnet50",
        bias_demo=dict(epochs=5, batch_size=128, lr=2e-3, max_per_class=None, max_val_per_class=None),
        teacher=dict(epochs=90, batch_size=128, lr=2e-3, max_per_class=None),
        student=dict(epochs=100, batch_size=128, lr=2e-3, max_per_class=260, max_val_per_class=None),
        seeds=(0,), replay_epochs=100,
        sweep=dict(temperatures=(1.0, 2.0, 4.0), alphas=(0.25, 0.5, 0.75, 1.0), ks=(1, 3, 5, 10),
                   variants=("tinyvit_5m", "tinyvit_11m", "tinyvit_21m"), epochs=100),
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
    root = project_root()
    settings["figures_dir"] = root / settings["figures_dir"]
    settings["runs_dir"] = root / settings["out_dir"] / "runs" / name
    settings["logits_dir"] = root / settings["out_dir"] / "logits" / name
    settings["results_dir"] = root / settings["out_dir"] / "results" / name
    return settings


def run_spec(settings: dict, name: str, *, role: str = "student", seed: int = 0, model: str | None = None,
             **train_changes) -> RunSpec:
    """The `RunSpec` of a run of this profile; `role` names its budget ("teacher", "student",
    "bias_demo"); `train_changes` override TrainConfig fields (e.g. distill_alpha=0.5) and `model`
    the architecture (default: the profile's teacher for the teacher, TinyViT-5M otherwise)."""
    budget = settings[role]
    config = TrainConfig(epochs=budget["epochs"], batch_size=budget["batch_size"], lr=budget["lr"],
                         warmup_epochs=min(1.0, budget["epochs"] / 4), seed=seed)
    return RunSpec(name=name, dataset=settings["dataset"], data_root=settings["data_root"],
                   model=model or (settings["teacher_model"] if role == "teacher" else "tinyvit_5m"),
                   img_size=settings["img_size"], augment=settings["augment"],
                   max_per_class=budget["max_per_class"], max_val_per_class=budget.get("max_val_per_class"),
                   output_dir=str(settings["runs_dir"]), train=replace(config, **train_changes))


def distillation_runs(settings: dict, seed: int, *, teacher_checkpoint: Path, stores: dict[str, Path],
                      model: str = "tinyvit_5m", alpha: float | None = None,
                      temperature: float | None = None) -> dict[str, RunSpec]:
    """The student runs of notebook 03 for one seed: no teacher, static store, replay store, online
    teacher. All share data, budget and seed; only where the teacher's distribution comes from differs."""
    alpha = settings["alpha"] if alpha is None else alpha
    temperature = settings["temperature"] if temperature is None else temperature
    base = run_spec(settings, f"{model}_baseline_s{seed}", seed=seed, model=model)
    kd = dict(distill_alpha=alpha, distill_temp=temperature)

    def distilled(kind: str, **where) -> RunSpec:
        return replace(base, name=f"{model}_{kind}_a{alpha:g}_t{temperature:g}_s{seed}",
                       train=replace(base.train, **kd), **where)

    return {
        "baseline": base,
        "static store": distilled("static", logits_path=str(stores["static"])),
        "replay store": distilled("replay", logits_path=str(stores["replay"])),
        "online teacher": distilled("online", teacher_model=settings["teacher_model"],
                                    teacher_checkpoint=str(teacher_checkpoint)),
    }
