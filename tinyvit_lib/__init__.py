"""tinyvit_lib: TinyViT and fast pretraining distillation, as used by the course's notebooks."""

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
    load_pretrained,
    tinyvit_5m,
    tinyvit_11m,
    tinyvit_21m,
)
from .data import (
    DATASETS,
    DatasetWithIDs,
    get_CIFAR_100,
    get_dataset,
    get_ImageNet1K,
    get_imagenet_subset_loaders,
    make_loaders,
)
from .augment import (
    AugmentConfig,
    EvalTransform,
    PairedMix,
    TrainTransform,
    sample_seed,
)

__version__ = "0.1.0"
