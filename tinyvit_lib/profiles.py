"""Run profiles of the course: one typed object of settings shared by every notebook.

A notebook's `parameters` cell names a profile (papermill: `-p profile fast`, or
`make run-all PROFILE=...`); the environment variable TINYVIT_FAST=1 (set by `make test`) selects
the fast profile, which runs every code path on tiny data in seconds. Every size, budget and
hyper-parameter of the notebooks lives here, and so does every path a profile implies (teacher
checkpoint, logit stores, results), so no literal is scattered across them:

    P = resolve_profile("default")
    P.student.epochs, P.teacher_checkpoint, P.store_path("replay"), P.results_file("03_students.jsonl")

The course's protocol in every profile. A validation set is carved from the training images by
permanent ID (`val_per_class`); nobody trains on it, and every choice is made on it. The rest is
the **pool**. The teacher trains on the pool (it stands for a big pretrained model). A student either
trains on the **labelled set** (a per-class subset of the pool), from labels or from the teacher, or
is first pretrained on the whole pool (from the teacher's stored logits, or from the pool's labels as
the control) and then fine-tuned on the labelled set. The held-out split is the test set: read only
for the final numbers (`experiment.test_set`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .augment import AUGMENT_PRESETS
from .data import DATASETS, DataSpec, dataset_channels
from .experiment import RunSpec
from .trainer import TrainConfig
from .utils import project_root

__all__ = [
    "Budget",
    "Sweep",
    "OwnData",
    "Profile",
    "PROFILES",
    "resolve_profile",
    "scratch",
    "project_root",
    "run_spec",
    "store_specs",
    "teacher_spec",
    "distillation_runs",
    "CONDITIONS",
    "PATIENCE_CONDITIONS",
    "pretrain_spec",
    "finetune_spec",
    "condition_runs",
    "patience_spec",
    "sweep_spec",
]

TEACHER_RUN = "teacher"  # the teacher's run folder under runs_dir: notebook 02 writes it, 03-05 read it
# The stores notebook 02 writes: name -> (mode, what they cover). "static": one record per labelled image
# (its evaluation view); "replay": one per labelled image and epoch (the augmented view); "mixed": the same
# for views mixed in pairs (function matching); "pool": replayed views of the whole pool, for pretraining.
STORES = ("static", "replay", "mixed", "pool")
STORE_MODES = ("static", "replay")  # how a store's records are keyed (see `logit_store`)
# Notebook 03's conditions: one student (TinyViT-5M), one fine-tuning budget on the labelled set.
CONDITIONS = ("labels only", "distilled", "pretrain-distilled", "pretrain-supervised")
# Notebook 04's: how the labelled set is taught (Beyer et al. 2022): labels; a fixed teacher (its
# targets for the un-augmented image, the static store); a consistent one (the same view, replayed);
# function matching (the same mixed view, replayed).
PATIENCE_CONDITIONS = ("labels only", "fixed teacher", "consistent teacher", "function matching")


@dataclass(frozen=True)
class Budget:
    """What one kind of run may spend: epochs, batch, learning rate and how many images.

    Raises:
        ValueError: a count below 1 or a learning rate that is not positive.
    """

    epochs: int  # passes over the (sub)set; warm-up is min(1, epochs / 4) of them
    batch_size: int
    lr: float  # peak AdamW learning rate (after warm-up, before the cosine decay)
    max_per_class: int | None = None  # training images per class (a deterministic subset); None: all
    max_val_per_class: int | None = None  # validation images per class; None: all

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_per_class", "max_val_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Budget.{name}={value} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"Budget.lr={self.lr} must be > 0")


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """Notebook 05's grid. The values default to the full grid; a profile sets only the epochs
    (and the fast profile a smaller grid).

    Raises:
        ValueError: an empty axis, T <= 0, alpha outside [0, 1], k or epochs below 1.
    """

    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)  # distillation temperatures T of the T x alpha grid
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # weights of the teacher's term (0: labels only)
    ks: tuple[int, ...] = (1, 3, 5, 10)  # top-k ablation: logits kept per record (each <= the profile's k)
    variants: tuple[str, ...] = ("tinyvit_5m", "tinyvit_11m", "tinyvit_21m")  # students read from one store
    epochs: int  # every sweep point's epochs (a name gains _e{epochs} when they differ from the student budget's)
    # the variants' pretraining pool: this many images per class of the pool (None: all of it, as notebook 03)
    variant_pool_per_class: int | None = None
    fidelity_per_class: int | None = 1000  # pool images per class for the top-k fidelity measure (None: all)

    def __post_init__(self) -> None:
        for name in ("temperatures", "alphas", "ks", "variants"):
            if not getattr(self, name):
                raise ValueError(f"Sweep.{name} is empty; give at least one value")
        checks = (
            ("temperatures", lambda t: t > 0, "> 0"),
            ("alphas", lambda a: 0 <= a <= 1, "in [0, 1]"),
            ("ks", lambda k: k >= 1, ">= 1"),
        )
        for name, ok, rule in checks:
            bad = [v for v in getattr(self, name) if not ok(v)]
            if bad:
                raise ValueError(f"Sweep.{name} holds {bad}: each must be {rule}")
        if self.epochs < 1:
            raise ValueError(f"Sweep.epochs={self.epochs} must be >= 1")
        for name in ("variant_pool_per_class", "fidelity_per_class"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Sweep.{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class OwnData:
    """Notebook 06's path from a folder of one's own images to a model another runtime loads: the
    folder's size, the teacher (started from a weights file), and the budgets.

    Raises:
        ValueError: a count below 1.
    """

    per_class: int = 200  # training images per class written to the folder (train/<class>/)
    held_out_per_class: int = 100  # held-out images per class (val/<class>/): the folder's test set
    val_per_class: int = 50  # validation carved from the folder's train/ by ID
    teacher: str = (
        "timm:resnet18"  # a name of `teachers.build_model`, started from a weights file in its library's format
    )
    teacher_epochs: int = 2
    student_epochs: int = 4
    batch_size: int = 64
    img_size: int = 32

    def __post_init__(self) -> None:
        for name in (
            "per_class",
            "held_out_per_class",
            "val_per_class",
            "teacher_epochs",
            "student_epochs",
            "batch_size",
            "img_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"OwnData.{name}={getattr(self, name)} must be >= 1")
        if self.val_per_class >= self.per_class:
            raise ValueError(f"OwnData.val_per_class={self.val_per_class} must be below per_class={self.per_class}")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Every setting of one profile, and the paths it implies (computed here, nowhere else).

    Raises:
        ValueError: an unknown dataset or augmentation, a value out of range, a sweep k above `k`
            (smaller stores are derived from the k store), students training more epochs than
            the replay store holds, or fewer than one patience length.
    """

    name: str  # the key in PROFILES; also the folder under runs/, logits/ and results/
    dataset: str  # a name of `data.DATASETS`
    img_size: int  # the course resolution (square), for training and test
    out_dir: str  # runs/, logits/ and results/ live under it (relative: to the project root)
    figures_folder: str  # where the notebooks save figures (relative: to the project root)
    bias_demo: Budget  # notebook 01's one short run that shows a learned attention bias
    teacher: Budget  # notebook 02's teacher, on the pool
    student: Budget  # students on the labelled set (max_per_class of the pool), and notebook 05's sweep points
    pretrain: Budget  # pretraining on the pool (max_per_class: a cut of it; None: all of it)
    finetune: Budget  # fine-tuning a pretrained student on the labelled set (the same images as `student`)
    seeds: tuple[int, ...]  # every reported condition runs once per seed; sweeps choose on the first
    val_per_class: int  # validation images carved from each class of the training split (by permanent ID)
    patience: tuple[int, ...]  # notebook 04's schedule lengths (epochs on the labelled set)
    patience_evals: int = 16  # a patience run validates every max(1, epochs // patience_evals) epochs and at the end
    replay_epochs: int  # views per labelled image in the replay and mixed stores: students may train that many epochs
    sweep: Sweep  # notebook 05's grid
    data_root: str | None = None  # where the data lives; None: the dataset's default place
    data_root_from_env: bool = False  # True: resolve_profile sets data_root from $DATA_ROOT (the GPU profiles)
    augment: str = "light"  # a key of AUGMENT_PRESETS: the students' and the replay store's views
    k: int = 10  # logits per record in the stores notebook 02 writes
    # The distillation recipe of notebooks 03 and 04 (notebook 05 sweeps both). Each profile states it; the
    # course's is the paper's, alpha = 1 and T = 1: the official code trains the student on the stored teacher
    # probabilities alone (labels only feed the accuracy meters).
    alpha: float  # weight of the teacher's term (0: labels only)
    temperature: float  # distillation temperature T
    teacher_model: str = "resnet18"  # the teacher's architecture (a name of `teachers.build_model`)
    figure_suffix: str = ""  # added to every figure's stem (`figure`), so profiles sharing a folder do not collide
    # the notebooks `make run-all` executes for this profile, by number (None: all of them)
    notebooks: tuple[str, ...] | None = None
    own_data: OwnData = OwnData()  # notebook 06: a folder of one's own images, distilled and exported
    # an out_dir whose teacher, stores and notebook-02 results this profile reads instead of its own
    # (`scratch`: exercises that leave notebook 02's products alone); None: its own
    stores_from: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"Profile.dataset={self.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"Profile.augment={self.augment!r} is unknown; choose one of {sorted(AUGMENT_PRESETS)}")
        for name in ("img_size", "k", "replay_epochs", "val_per_class", "patience_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"Profile.{name}={getattr(self, name)} must be >= 1")
        if not self.seeds:
            raise ValueError("Profile.seeds is empty; give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Profile.seeds={self.seeds} repeats a seed: each seed counts once")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"Profile.alpha={self.alpha} must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"Profile.temperature={self.temperature} must be > 0")
        if max(self.sweep.ks) > self.k:
            raise ValueError(
                f"Profile.sweep.ks={self.sweep.ks} exceeds k={self.k}: smaller stores are derived "
                f"from the k={self.k} store, a bigger k needs the teacher again"
            )
        if not self.patience or min(self.patience) < 1:
            raise ValueError(f"Profile.patience={self.patience}: give at least one schedule length, each >= 1")
        if self.finetune.max_per_class != self.student.max_per_class:
            raise ValueError(
                f"Profile.finetune.max_per_class={self.finetune.max_per_class} differs from student.max_per_class="
                f"{self.student.max_per_class}: every condition ends on the same labelled set"
            )
        lengths = [("student.epochs", self.student.epochs), ("sweep.epochs", self.sweep.epochs)]
        lengths += [(f"patience[{i}]", epochs) for i, epochs in enumerate(self.patience)]
        for what, epochs in lengths:
            if epochs > self.replay_epochs:
                raise ValueError(
                    f"Profile.{what}={epochs} exceeds replay_epochs={self.replay_epochs}: the replay "
                    f"store holds one view per image and epoch"
                )

    @property
    def in_chans(self) -> int:
        """Input channels of the profile's images (1: grayscale)."""
        return dataset_channels(self.dataset)

    @property
    def runs_dir(self) -> Path:
        """Where every run of this profile lives, one folder per run name."""
        return project_root() / self.out_dir / "runs" / self.name

    @property
    def logits_dir(self) -> Path:
        """Where the logit stores of this profile live (see `store_path`; `stores_from`'s if set)."""
        return project_root() / (self.stores_from or self.out_dir) / "logits" / self.name

    @property
    def results_dir(self) -> Path:
        """Where the notebooks write their result files (see `results_file`)."""
        return project_root() / self.out_dir / "results" / self.name

    @property
    def figures_dir(self) -> Path:
        """Where the notebooks save their figures."""
        return project_root() / self.figures_folder

    @property
    def teacher_checkpoint(self) -> Path:
        """The teacher's best weights, written by notebook 02's run (`teacher_spec`; `stores_from`'s if set)."""
        return project_root() / (self.stores_from or self.out_dir) / "runs" / self.name / TEACHER_RUN / "best.pt"

    def store_path(self, store: str, k: int | None = None) -> Path:
        """The folder of notebook 02's store `store` (one of `STORES`), or, for a replay `k` below
        the profile's, of the smaller store notebook 05 derives from it.

        Raises:
            ValueError: an unknown store, a k for a store other than "replay", or k outside 1..self.k.
        """
        if store not in STORES:
            raise ValueError(f"unknown store {store!r}; choose one of {STORES}")
        if k is None or k == self.k:
            return self.logits_dir / store
        if store != "replay" or not 1 <= k < self.k:
            raise ValueError(
                f"no {store} store with k={k}: only replay stores with 1 <= k < {self.k} are derived "
                f"from the k={self.k} store"
            )
        return self.logits_dir / f"replay_k{k}"

    def figure(self, name: str) -> Path:
        """Where a notebook saves figure `name`: figure("04_patience.png") is figures/04_patience.png in
        the default profile and figures/04_patience_long.png in the long one."""
        stem, dot, ext = name.rpartition(".")
        return self.figures_dir / (f"{stem}{self.figure_suffix}.{ext}" if dot else f"{name}{self.figure_suffix}")

    def results_file(self, name: str) -> Path:
        """A notebook's results file, e.g. results_file("05_sweep.jsonl"). Notebook 02's files (its
        teacher's row and its stores' costs, "02_...") come from `stores_from` when it is set, with
        the teacher and stores they describe."""
        if self.stores_from and name.startswith("02_"):
            return project_root() / self.stores_from / "results" / self.name / name
        return self.results_dir / name


PROFILES: dict[str, Profile] = {
    # `make test`: every code path on the synthetic dataset, in seconds. Never a result.
    "fast": Profile(
        name="fast",
        alpha=1.0,
        temperature=1.0,
        dataset="synthetic",
        img_size=32,
        out_dir="build/fast",
        figures_folder="build/fast/figures",
        k=5,
        val_per_class=4,
        bias_demo=Budget(epochs=1, batch_size=32, lr=2e-3, max_per_class=8, max_val_per_class=4),
        teacher=Budget(epochs=1, batch_size=64, lr=2e-3, max_per_class=40),
        student=Budget(epochs=2, batch_size=32, lr=2e-3, max_per_class=12, max_val_per_class=2),
        pretrain=Budget(epochs=1, batch_size=32, lr=2e-3, max_val_per_class=2),
        finetune=Budget(epochs=2, batch_size=32, lr=1e-3, max_per_class=12, max_val_per_class=2),
        seeds=(0,),
        patience=(1, 2),
        patience_evals=1,  # the 2-epoch runs validate only at the end: the path of the long profile's runs
        replay_epochs=2,
        sweep=Sweep(
            temperatures=(1.0,),
            alphas=(0.5, 1.0),
            ks=(1, 5),
            variants=("tinyvit_5m", "tinyvit_11m"),
            epochs=2,
            variant_pool_per_class=16,
            fidelity_per_class=8,
        ),
        own_data=OwnData(
            per_class=8, held_out_per_class=4, val_per_class=2, teacher_epochs=1, student_epochs=1, batch_size=16
        ),
    ),
    # `make run-all` on a laptop CPU: Fashion-MNIST at 32x32, grayscale. 5,000 validation images, a pool
    # of 55,000, a labelled set of 3,000.
    "default": Profile(
        name="default",
        alpha=1.0,
        temperature=1.0,
        dataset="fashion-mnist",
        img_size=32,
        out_dir=".",
        figures_folder="figures",
        val_per_class=500,
        bias_demo=Budget(epochs=1, batch_size=128, lr=2e-3, max_per_class=1000, max_val_per_class=100),
        teacher=Budget(epochs=2, batch_size=128, lr=2e-3),
        student=Budget(epochs=4, batch_size=128, lr=2e-3, max_per_class=300, max_val_per_class=50),
        pretrain=Budget(epochs=1, batch_size=128, lr=2e-3, max_val_per_class=50),
        finetune=Budget(epochs=4, batch_size=128, lr=5e-4, max_per_class=300, max_val_per_class=50),
        seeds=(0, 1, 2),
        # 1 epoch (23 steps) left every condition at chance: no point of a curve. Two lengths, 2 and 8 epochs
        # (46 and 184 steps): a 4-epoch point cost about 6 minutes on a 2-core AVX2 CPU, where `make run-all`
        # with every run trained takes about an hour already (docs/performance.md); patience in its own
        # regime is the long profile's.
        patience=(2, 8),
        replay_epochs=8,
        sweep=Sweep(alphas=(0.5, 1.0), ks=(1, 3, 5, 10), epochs=4, variant_pool_per_class=300),
    ),
    # Notebook 04 where patience can show (`make run-all PROFILE=long` runs notebooks 02 and 04): the
    # default profile's data and teacher recipe, a labelled set of 64 images per class at batch 32 (20
    # steps an epoch), and schedules of 5 to 336 epochs (100 to 6,720 optimiser steps, 67x). Sized to
    # fit 3 hours on a 2-core CPU with native bf16 (the arithmetic is in docs/results.md).
    "long": Profile(
        name="long",
        alpha=1.0,
        temperature=1.0,
        dataset="fashion-mnist",
        img_size=32,
        out_dir=".",
        figures_folder="figures",
        figure_suffix="_long",
        notebooks=("02", "04"),
        val_per_class=500,
        bias_demo=Budget(epochs=1, batch_size=128, lr=2e-3, max_per_class=1000, max_val_per_class=100),
        teacher=Budget(epochs=2, batch_size=128, lr=2e-3),
        student=Budget(epochs=5, batch_size=32, lr=1e-3, max_per_class=64, max_val_per_class=50),
        pretrain=Budget(epochs=1, batch_size=128, lr=2e-3, max_val_per_class=50),
        finetune=Budget(epochs=5, batch_size=32, lr=5e-4, max_per_class=64, max_val_per_class=50),
        seeds=(0, 1, 2),
        patience=(5, 20, 80, 336),
        replay_epochs=336,
        sweep=Sweep(epochs=5),
    ),
    # A GPU with CIFAR-100 in DATA_ROOT (or downloadable): 32x32 RGB; 5,000 validation images, a pool of
    # 45,000, a labelled set of 10,000. Sized for a GPU; not run by the course's CPU sessions.
    "cifar100": Profile(
        name="cifar100",
        alpha=1.0,
        temperature=1.0,
        dataset="cifar100",
        data_root_from_env=True,
        img_size=32,
        out_dir=".",
        figures_folder="figures/cifar100",
        val_per_class=50,
        bias_demo=Budget(epochs=5, batch_size=256, lr=2e-3),
        teacher=Budget(epochs=60, batch_size=256, lr=2e-3),
        student=Budget(epochs=100, batch_size=256, lr=2e-3, max_per_class=100),
        pretrain=Budget(epochs=60, batch_size=256, lr=2e-3),
        finetune=Budget(epochs=100, batch_size=256, lr=5e-4, max_per_class=100),
        seeds=(0, 1, 2),
        patience=(25, 100, 200),
        replay_epochs=200,
        sweep=Sweep(epochs=100),
    ),
    # A GPU with an ImageNet-1k tree in DATA_ROOT: validation carved from train (10 per class), the official
    # val folder is the test set; the teacher sees the pool, the labelled set is 260 images per class.
    "imagenet-subset": Profile(
        name="imagenet-subset",
        alpha=1.0,
        temperature=1.0,
        dataset="imagenet",
        data_root_from_env=True,
        img_size=224,
        out_dir=".",
        figures_folder="figures/imagenet-subset",
        teacher_model="resnet50",
        val_per_class=10,
        bias_demo=Budget(epochs=5, batch_size=128, lr=2e-3),
        teacher=Budget(epochs=90, batch_size=128, lr=2e-3),
        student=Budget(epochs=100, batch_size=128, lr=2e-3, max_per_class=260),
        pretrain=Budget(epochs=30, batch_size=128, lr=2e-3),
        finetune=Budget(epochs=30, batch_size=128, lr=5e-4, max_per_class=260),
        seeds=(0, 1, 2),
        patience=(25, 100, 200),
        replay_epochs=200,
        sweep=Sweep(epochs=100),
    ),
}


SCRATCH_DIR = "build/try"  # where exercises write (git-ignored): never the course's results or figures


def scratch(profile: Profile, *, own_teacher_and_stores: bool = False) -> Profile:
    """`profile` for an exercise: its runs, results and figures go under build/try/ (ignored by git),
    so an exercise never overwrites the course's committed results or figures. By default it reads
    the course's teacher, stores and notebook-02 results (an exercise of notebooks 03-05 that leaves
    them alone starts at once); `own_teacher_and_stores=True` gives it its own, for an exercise that
    changes notebook 02 (run notebook 02 with it first, then the others with the same line)."""
    return replace(
        profile,
        out_dir=SCRATCH_DIR,
        figures_folder=f"{SCRATCH_DIR}/figures/{profile.name}",  # profiles share figure names: one folder each
        stores_from=None if own_teacher_and_stores else (profile.stores_from or profile.out_dir),  # twice: the same
    )


def resolve_profile(name: str) -> Profile:
    """Profile `name`, or "fast" when TINYVIT_FAST=1; a GPU profile's data_root is read from $DATA_ROOT
    now. Its paths (`runs_dir`, `store_path`, ...) are absolute, under `project_root()`.

    Raises:
        ValueError: `name` is not a known profile.
    """
    if os.environ.get("TINYVIT_FAST") == "1":
        name = "fast"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    if profile.data_root_from_env:
        profile = replace(profile, data_root=os.environ.get("DATA_ROOT"))
    return profile


def run_spec(
    profile: Profile, name: str, *, role: str = "student", seed: int = 0, model: str | None = None, **train_changes
) -> RunSpec:
    """The `RunSpec` of a run of this profile; `role` names its budget ("teacher", "student",
    "pretrain", "finetune", "bias_demo"); `train_changes` override TrainConfig fields (e.g.
    alpha=0.5; `epochs` also moves the warm-up, a quarter of them up to one) and `model` the
    architecture (default: the profile's teacher for the teacher, TinyViT-5M otherwise). Every run
    validates on the profile's carve, so none sees the test set.

    Raises:
        ValueError: an unknown role; TypeError: a train_changes key that is not a TrainConfig field.
    """
    if role not in ("teacher", "student", "pretrain", "finetune", "bias_demo"):
        raise ValueError(f"unknown role {role!r}; choose one of teacher, student, pretrain, finetune, bias_demo")
    budget: Budget = getattr(profile, role)
    epochs = train_changes.pop("epochs", budget.epochs)
    config = TrainConfig(
        epochs=epochs, batch_size=budget.batch_size, lr=budget.lr, warmup_epochs=min(1.0, epochs / 4), seed=seed
    )
    data = DataSpec(
        dataset=profile.dataset,
        root=profile.data_root,
        img_size=profile.img_size,
        augment=profile.augment,
        max_per_class=budget.max_per_class,
        max_val_per_class=budget.max_val_per_class,
        val_per_class=profile.val_per_class,
    )
    return RunSpec(
        name=name,
        data=data,
        model=model or (profile.teacher_model if role == "teacher" else "tinyvit_5m"),
        output_dir=str(profile.runs_dir),
        train=replace(config, **train_changes),
    )


def store_specs(profile: Profile) -> dict[str, tuple[str, DataSpec, int]]:
    """Notebook 02's stores (`STORES`): name -> (mode, the data spec of the images and views it covers,
    epochs of views). The labelled-set stores cover the students' data; the pool store, pretraining's."""
    labelled = run_spec(profile, "labelled set").data
    pool = run_spec(profile, "pool", role="pretrain").data
    return {
        "static": ("static", replace(labelled, augment="none"), 1),
        "replay": ("replay", labelled, profile.replay_epochs),
        "mixed": ("replay", replace(labelled, mix="function-matching"), profile.replay_epochs),
        "pool": ("replay", pool, profile.pretrain.epochs),
    }


def teacher_spec(profile: Profile) -> RunSpec:
    """Notebook 02's teacher run (on the pool), whose best weights are `profile.teacher_checkpoint`."""
    return run_spec(profile, TEACHER_RUN, role="teacher")


def distillation_runs(
    profile: Profile,
    seed: int,
    *,
    model: str = "tinyvit_5m",
    alpha: float | None = None,
    temperature: float | None = None,
    epochs: int | None = None,
) -> dict[str, RunSpec]:
    """The students on the labelled set for one seed: "baseline" (labels), and distilled from
    "static store", "replay store", "mixed store" (function matching) and an "online teacher" (the
    stores and teacher of notebook 02). All share data, budget and seed; only where the teacher's
    distribution comes from differs. `alpha`, `temperature`: default the profile's; `epochs`: the
    student budget's (a name gains _e{epochs} when it differs)."""
    alpha = profile.alpha if alpha is None else alpha
    temperature = profile.temperature if temperature is None else temperature
    epochs = profile.student.epochs if epochs is None else epochs
    suffix = f"_e{epochs}" if epochs != profile.student.epochs else ""
    base = run_spec(profile, f"{model}_baseline_s{seed}", seed=seed, model=model, epochs=epochs)
    base = replace(base, name=f"{model}_baseline{suffix}_s{seed}")
    kd = dict(alpha=alpha, temperature=temperature)

    def distilled(kind: str, mix: str | None = None, **where) -> RunSpec:
        name = f"{model}_{kind}_a{alpha:g}_t{temperature:g}{suffix}_s{seed}"
        return replace(base, name=name, data=replace(base.data, mix=mix), train=replace(base.train, **kd), **where)

    return {
        "baseline": base,
        "static store": distilled("static", logits_path=str(profile.store_path("static"))),
        "replay store": distilled("replay", logits_path=str(profile.store_path("replay"))),
        "mixed store": distilled("mixed", mix="function-matching", logits_path=str(profile.store_path("mixed"))),
        "online teacher": distilled(
            "online", teacher_model=profile.teacher_model, teacher_checkpoint=str(profile.teacher_checkpoint)
        ),
    }


def pretrain_spec(
    profile: Profile, seed: int, *, distilled: bool, model: str = "tinyvit_5m", max_per_class: int | None = None
) -> RunSpec:
    """Pretraining on the pool: from the pool store with no labels (`distilled`: alpha 1, the
    profile's T) or from the pool's labels (the control). `max_per_class`: a cut of the pool (default
    the pretrain budget's); the name gains _p{n} when it differs."""
    cut = profile.pretrain.max_per_class if max_per_class is None else max_per_class
    kind = "distilled" if distilled else "supervised"
    suffix = f"_p{cut}" if cut != profile.pretrain.max_per_class else ""
    spec = run_spec(profile, f"{model}_pretrain_{kind}{suffix}_s{seed}", role="pretrain", seed=seed, model=model)
    spec = replace(spec, data=replace(spec.data, max_per_class=cut))
    if not distilled:
        return spec
    train = replace(spec.train, alpha=1.0, temperature=profile.temperature)
    return replace(spec, train=train, logits_path=str(profile.store_path("pool")))


def finetune_spec(profile: Profile, pretrained: RunSpec) -> RunSpec:
    """Fine-tuning `pretrained`'s final weights on the labelled set, from labels, with the fine-tuning
    budget (the same seed and model)."""
    name = pretrained.name.replace("_pretrain_", "_finetune_", 1)
    spec = run_spec(profile, name, role="finetune", seed=pretrained.train.seed, model=pretrained.model)
    return replace(spec, init_from=str(pretrained.run_dir / "last.pt"))


def condition_runs(profile: Profile, seed: int, *, model: str = "tinyvit_5m") -> dict[str, list[RunSpec]]:
    """Notebook 03's runs for one seed: each of `CONDITIONS` -> its runs in order (a pretraining run
    first, then its fine-tuning); the last run of each is the condition's student."""
    students = distillation_runs(profile, seed, model=model)
    runs = {"labels only": [students["baseline"]], "distilled": [students["replay store"]]}
    for distilled in (True, False):
        pretrained = pretrain_spec(profile, seed, distilled=distilled, model=model)
        runs[CONDITIONS[2 if distilled else 3]] = [pretrained, finetune_spec(profile, pretrained)]
    return runs


def patience_spec(profile: Profile, seed: int, condition: str, epochs: int) -> RunSpec:
    """Notebook 04's run of `condition` (one of `PATIENCE_CONDITIONS`) for `epochs` on the labelled
    set, validating about `profile.patience_evals` times; at the student budget's epochs, where it
    validates every epoch, it is notebook 03's run of the same teaching (and reuses it). Where it
    validates less often at those epochs (a budget of 2 x patience_evals epochs or more), it is
    another run, named with `_v<every>`: it never retrains over notebook 03's.

    Raises:
        ValueError: an unknown condition.
    """
    kinds = dict(zip(PATIENCE_CONDITIONS, ("baseline", "static store", "replay store", "mixed store"), strict=True))
    if condition not in kinds:
        raise ValueError(f"unknown patience condition {condition!r}; choose one of {PATIENCE_CONDITIONS}")
    spec = distillation_runs(profile, seed, epochs=epochs)[kinds[condition]]
    eval_every = max(1, epochs // profile.patience_evals)  # 1 below 2 x patience_evals epochs: notebook 03's runs
    spec = replace(spec, train=replace(spec.train, eval_every=eval_every))
    if eval_every > 1 and epochs == profile.student.epochs:  # notebook 03's name, another validation schedule
        spec = replace(spec, name=f"{spec.name}_v{eval_every}")
    return spec


def sweep_spec(
    profile: Profile,
    seed: int,
    *,
    model: str = "tinyvit_5m",
    alpha: float | None = None,
    temperature: float | None = None,
    k: int | None = None,
) -> RunSpec:
    """One point of notebook 05's grid: the replay-store student with another model, alpha, T or
    store k (None: the profile's), trained for `profile.sweep.epochs`. Its name is the replay run's,
    plus `_k{k}` when k differs from the profile's (and `_e{epochs}` when the sweep's epochs differ
    from the student budget's), so the point with notebook 03's settings *is* its run (and reuses it).

    Raises:
        ValueError: a k with no replay store (see `Profile.store_path`).
    """
    k = profile.k if k is None else k
    runs = distillation_runs(
        profile, seed, model=model, alpha=alpha, temperature=temperature, epochs=profile.sweep.epochs
    )
    spec = runs["replay store"]
    return replace(
        spec, name=spec.name + (f"_k{k}" if k != profile.k else ""), logits_path=str(profile.store_path("replay", k))
    )
