"""Building models by name: TinyViT students, torchvision classifiers (the course's teachers) and any
timm model ("timm:convnext_tiny"), and starting them from a weights file (`start_from`: TinyViT's
released weights, a timm or torchvision file, with the head and input channels adapted).

A torchvision classifier is adapted to the task: its first convolution takes `in_chans` channels
and its classifier outputs `num_classes`; the architecture is otherwise torchvision's (a ResNet
keeps its stride-4 stem, which at 32x32 makes it cheap enough to train on a laptop CPU). In
training its convolutions compute a one-pixel output, and in fp32 a 2x2 map, as a matrix product,
and in fp32 a 3x3 convolution on a small map (4x4, 8x8) by Winograd's algorithm
(`model.SmallMapConv2d`: the same function, rounding aside, and the same state dict, faster on the
small maps a ResNet works on at 32x32); its inference copy (`model.inference_copy`) runs torchvision's convolutions with
BatchNorm folded in, so the teacher's logits do not depend on these paths.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import torchvision

from .model import (
    PRESETS,
    adapt_input_conv,
    build_tinyvit,
    load_pretrained,
    read_weights,
    state_dict_problems,
    with_small_map_convs,
)
from .utils import load_checkpoint

__all__ = ["build_model", "load_weights", "start_from", "model_names", "describe_model"]


TIMM_PREFIX = "timm:"  # "timm:convnext_tiny": any model of timm's, by its timm name


def model_names() -> list[str]:
    """TinyViT presets and torchvision's classification models (any timm model also builds, as
    "timm:<name>")."""
    return sorted(PRESETS) + sorted(torchvision.models.list_models(module=torchvision.models))


def _first_conv_for(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )


def build_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 224, **overrides) -> nn.Module:
    """A freshly initialised model: a TinyViT preset ("tinyvit_5m", ...), a torchvision classifier
    ("resnet18") or a timm model ("timm:convnext_tiny"; nothing is downloaded: weights come from a
    file, see `start_from`).

    `overrides` go to the TinyViT config (e.g. drop_path_rate); torchvision and timm models take none.

    Raises:
        ValueError: an unknown name, overrides for a torchvision or timm model, or a torchvision model
            whose first convolution or classifier this function does not know how to adapt.
    """
    if name in PRESETS:
        return build_tinyvit(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX) :], num_classes=num_classes, in_chans=in_chans, overrides=overrides)
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


def _start_classifier_from(model: nn.Module, path: str | Path) -> list[str]:
    """`start_from` for a torchvision or timm classifier: the file's state dict (a timm `.pth` or
    `.safetensors`, a torchvision `.pth`, or this library's checkpoint), the classifier left at its
    initialisation where its class count differs, an RGB first convolution summed for grayscale.

    Raises:
        ValueError: the weights do not fit otherwise (the library, the model and the keys are named).
    """
    state = dict(read_weights(path))
    target = model.state_dict()
    notes = []
    first = next(name for name, p in model.named_parameters() if p.ndim == 4)  # the first convolution's weight
    if first in state and state[first].ndim == 4 and state[first].shape[1] != target[first].shape[1]:
        notes.append(
            f"first convolution adapted from {state[first].shape[1]} input channels to {target[first].shape[1]}"
        )
        state[first] = adapt_input_conv(state[first], target[first].shape[1])
    head = _classifier_keys(model)
    if any(k in state and state[k].shape != target[k].shape for k in head):
        notes.append(f"head replaced: the checkpoint's classifier ({', '.join(head)}) has another class count")
        state.update({k: target[k] for k in head})
    problems = state_dict_problems(target, state)
    if problems:
        library = "timm" if type(model).__module__.startswith("timm") else "torchvision"
        raise ValueError(f"{path} does not fit {library}'s {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)
    return notes


def _classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of a classifier's last layer (timm: `get_classifier()`; else its last Linear)."""
    last = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(last, nn.Module) or not list(last.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:  # e.g. SqueezeNet, whose classifier is a convolution
            raise ValueError(f"{type(model).__name__} has no head this can replace (no get_classifier, no Linear)")
        last = linears[-1]
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in last.parameters()]


def _build_timm(name: str, *, num_classes: int, in_chans: int, overrides: dict) -> nn.Module:
    """timm's model `name` with `num_classes` outputs and `in_chans` input channels, randomly initialised."""
    import timm

    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    if overrides:
        raise ValueError(f"options {sorted(overrides)} apply to TinyViT models only, not timm's {name}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


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
        ValueError: the file cannot be read or does not fit the model (names the differences), or a
            classifier whose head cannot be found (no `get_classifier`, no Linear layer).
    """
    if not (hasattr(model, "config") and hasattr(model, "stages")):
        return _start_classifier_from(model, path)
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
