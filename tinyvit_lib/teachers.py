"""Building models by name: TinyViT students and torchvision classifiers (the course's teachers).

A torchvision classifier is adapted to the task: its first convolution takes `in_chans` channels
and its classifier outputs `num_classes`; the architecture is otherwise torchvision's (a ResNet
keeps its stride-4 stem, which at 32x32 makes it cheap enough to train on a laptop CPU). In
training its convolutions compute a one-pixel output, and in fp32 a 2x2 map, as a matrix product
(`model.SmallMapConv2d`: the same function and state dict, faster on the 2x2 and 1x1 maps where a
ResNet ends at 32x32); its inference copy (`model.inference_copy`) runs torchvision's convolutions
with BatchNorm folded in.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import torchvision

from .model import PRESETS, build_tinyvit, load_pretrained, read_weights, state_dict_problems, with_small_map_convs
from .utils import load_checkpoint

__all__ = ["build_model", "load_weights", "start_from", "model_names", "describe_model"]


def model_names() -> list[str]:
    """TinyViT presets and torchvision's classification models."""
    return sorted(PRESETS) + sorted(torchvision.models.list_models(module=torchvision.models))


def _first_conv_for(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )


def build_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 224, **overrides) -> nn.Module:
    """A freshly initialised model: a TinyViT preset ("tinyvit_5m", ...) or a torchvision classifier.

    `overrides` go to the TinyViT config (e.g. drop_path_rate); torchvision models take none.

    Raises:
        ValueError: an unknown name, overrides for a torchvision model, or a torchvision model whose
            first convolution or classifier this function does not know how to adapt.
    """
    if name in PRESETS:
        return build_tinyvit(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown model {name!r}: use one of {sorted(PRESETS)} or a torchvision "
            f"classifier such as resnet18 (see torchvision.models.list_models())"
        )
    if overrides:
        raise ValueError(f"options {sorted(overrides)} apply to TinyViT models only, not {name}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_chans != 3:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        parent = next((p for p in model.modules() for c in p.children() if c is first), None)
        if first is None or parent is None:
            raise ValueError(f"cannot adapt {name} to in_chans={in_chans}")
        for child_name, child in parent.named_children():
            if child is first:
                setattr(parent, child_name, _first_conv_for(first, in_chans))
    return with_small_map_convs(model)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into a model built by `build_model`, in place; returns it.

    TinyViT models go through `load_pretrained` (official, timm or our own checkpoints); other
    models take a state dict saved by our trainer (`{'model': ...}`) or a plain one.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read or does not fit the model (names the differences).
    """
    if hasattr(model, "config") and hasattr(model, "stages"):
        return load_pretrained(model, path)
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    problems = state_dict_problems(model.state_dict(), state) if isinstance(state, dict) else ["not a state dict"]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model


def start_from(model: nn.Module, path: str | Path) -> list[str]:
    """Load the weights a run starts from (`RunSpec.init_from`) into `model`, in place, and return
    what had to change, one line each (empty: the checkpoint fit as it was).

    A TinyViT takes a checkpoint of this library's trainer, or TinyViT's released weights in the
    official (Cream) or timm key names, `.pth` or `.safetensors`, at any resolution (attention-bias
    tables resized to the model's windows): when the checkpoint classifies another number of classes
    the head keeps the model's new initialisation, and an RGB checkpoint's first convolution is
    summed over its channels for a grayscale model. Any other model takes a state dict of its own
    shape (`load_weights`).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read or does not fit the model (names the differences).
    """
    if not (hasattr(model, "config") and hasattr(model, "stages")):
        load_weights(model, path)
        return []
    state = read_weights(path)
    notes = []
    head = next((state[k].shape[0] for k in ("head.fc.weight", "head.weight") if k in state), None)
    if head is not None and head != model.config.num_classes:
        notes.append(f"head replaced: the checkpoint classifies {head} classes, the model {model.config.num_classes}")
    first = next(
        (state[k] for k in ("patch_embed.conv1.conv.weight", "patch_embed.seq.0.c.weight") if k in state), None
    )
    if first is not None and first.shape[1] != model.config.in_chans:
        notes.append(f"first convolution adapted from {first.shape[1]} input channels to {model.config.in_chans}")
    load_pretrained(model, state, skip_head=head != model.config.num_classes, adapt_in_chans=True)
    return notes


def describe_model(model: nn.Module) -> str:
    """'ResNet, 11,173,962 parameters' — for logs and manifests."""
    return f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters"
