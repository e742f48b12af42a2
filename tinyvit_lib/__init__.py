"""tinyvit_lib: TinyViT and fast pretraining distillation, as used by the course's notebooks."""

from .augment import (
    AUGMENT_PRESETS,
    MIX_PRESETS,
    AugmentConfig,
    EvalTransform,
    MixConfig,
    PairMix,
    TrainTransform,
    mix_partners,
    sample_seed,
)
from .compat import FastDistillation, get_CIFAR_100, get_ImageNet1K, get_imagenet_subset_loaders
from .data import DATASETS, DatasetWithIDs, DataSpec, build, get_dataset, make_loaders
from .distill import DistillationLoss, OnlineTeacher, StoredTeacher, precompute, verify_store
from .experiment import RunSpec, load_trained, run, run_or_reuse
from .logit_store import LogitStore
from .model import (
    PRESETS,
    Attention,
    MBConv,
    Mlp,
    PatchEmbed,
    PatchMerging,
    TinyViT,
    TinyViTConfig,
    TransformerBlock,
    count_flops,
    fuse_for_inference,
    inference_copy,
    load_pretrained,
    tinyvit_5m,
    tinyvit_11m,
    tinyvit_21m,
)
from .teachers import build_model, describe_model
from .trainer import TrainConfig, evaluate

# `tinyvit_lib.train` is the command-line module (`python -m tinyvit_lib.train`), nothing else: the
# training function is `tinyvit_lib.trainer.train`, and `tinyvit_lib.run(spec)` trains a described run.

__all__ = [
    "PRESETS",
    "Attention",
    "MBConv",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "TinyViT",
    "TinyViTConfig",
    "TransformerBlock",
    "count_flops",
    "fuse_for_inference",
    "inference_copy",
    "load_pretrained",
    "tinyvit_5m",
    "tinyvit_11m",
    "tinyvit_21m",
    "DATASETS",
    "DataSpec",
    "build",
    "DatasetWithIDs",
    "get_CIFAR_100",
    "get_dataset",
    "get_ImageNet1K",
    "get_imagenet_subset_loaders",
    "make_loaders",
    "AUGMENT_PRESETS",
    "AugmentConfig",
    "MixConfig",
    "EvalTransform",
    "PairMix",
    "MIX_PRESETS",
    "mix_partners",
    "TrainTransform",
    "sample_seed",
    "DistillationLoss",
    "FastDistillation",
    "OnlineTeacher",
    "StoredTeacher",
    "precompute",
    "verify_store",
    "LogitStore",
    "build_model",
    "describe_model",
    "TrainConfig",
    "evaluate",
    "RunSpec",
    "load_trained",
    "run",
    "run_or_reuse",
]

__version__ = "0.1.0"
