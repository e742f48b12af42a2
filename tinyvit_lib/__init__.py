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

__version__ = "0.1.0"
