"""TinyViT: the model family of "TinyViT: Fast Pretraining Distillation for Small Vision
Transformers" (Wu et al., ECCV 2022).

Layout (shapes for a 224x224 input, TinyViT-5M):

    image (B, 3, 224, 224)
      -> PatchEmbed        two stride-2 3x3 ConvBN            (B, 64, 56, 56)
      -> stage 0           MBConv blocks                      (B, 64, 56, 56)
      -> stage 1..3        PatchMerging, then TransformerBlocks (window attention,
                           depthwise local conv, MLP)          (B, 128, 28, 28) ... (B, 320, 7, 7)
      -> ClassifierHead    global average, LayerNorm, Linear  (B, num_classes)

No class token and no absolute position embedding: position enters through the learned
attention bias (one value per head and per relative offset inside a window) and through the
depthwise convolutions.

Windows follow the resolution: a window is never larger than its stage's feature map, so at
32x32 input the 4x4, 2x2 and 1x1 maps of stages 1-3 get plain attention over the whole map,
with no padding tokens (timm's fixed 14x14 window would pad a 2x2 map to 196 tokens).

State-dict keys follow timm's naming (`stages.i`, `head.fc`), so timm weights load as they
are; `load_pretrained` also maps the official Cream naming (`layers.i`, `.c.`, `norm_head`).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import is_integer, load_checkpoint

__all__ = [
    "TinyViTConfig",
    "TinyViT",
    "PRESETS",
    "tinyvit_5m",
    "tinyvit_11m",
    "tinyvit_21m",
    "build_tinyvit",
    "ConvBN",
    "small_map_depthwise",
    "pointwise_conv",
    "SmallMapConv2d",
    "with_small_map_convs",
    "small_map_conv",
    "winograd_conv3x3",
    "PatchEmbed",
    "MBConv",
    "PatchMerging",
    "Mlp",
    "Attention",
    "TransformerBlock",
    "load_pretrained",
    "official_to_ours",
    "ours_to_official",
    "default_window_sizes",
    "stage_resolutions",
    "count_flops",
    "fuse_for_inference",
    "inference_copy",
    "state_dict_problems",
]


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TinyViTConfig:
    """Everything that defines a TinyViT. Defaults are TinyViT-5M at 224x224 on ImageNet-1k.

    Raises:
        ValueError: a field is out of range or the per-stage tuples disagree in length.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 is convolutional: its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # stage 0's entry is unused likewise
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path_rate: float = 0.0
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int = 224

    def __post_init__(self) -> None:
        for name in ("embed_dims", "depths", "num_heads", "window_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from JSON/CLI
        n = len(self.depths)
        if n < 2:
            raise ValueError(f"TinyViT needs at least 2 stages (one MBConv, one attention), got depths={self.depths}")
        for name in ("embed_dims", "num_heads", "window_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}={getattr(self, name)} must have one entry per stage (depths={self.depths})")
        for name in ("embed_dims", "depths", "num_heads", "window_sizes"):
            if any(not is_integer(v) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must hold positive integers")
        for name in ("img_size", "in_chans", "num_classes", "local_conv_size"):
            if not is_integer(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer")
        for name in ("mlp_ratio", "mbconv_expand_ratio", "drop_path_rate"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be finite")
        for i in range(1, n):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(
                    f"stage {i}: embed_dim {self.embed_dims[i]} is not divisible by num_heads {self.num_heads[i]}"
                )
        if self.local_conv_size < 1 or self.local_conv_size % 2 == 0:
            raise ValueError(f"local_conv_size must be a positive odd integer, got {self.local_conv_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mlp_ratio <= 0 or self.mbconv_expand_ratio <= 0:
            raise ValueError(
                f"mlp_ratio ({self.mlp_ratio}) and mbconv_expand_ratio ({self.mbconv_expand_ratio}) must be positive"
            )
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {self.num_classes}")
        if self.img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {self.img_size}")

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's three variants. Drop-path rates are the official ImageNet pretraining ones.
PRESETS: dict[str, dict] = {
    # 5,392,764 parameters at 224 with 1000 classes
    "tinyvit_5m": dict(embed_dims=(64, 128, 160, 320), num_heads=(2, 4, 5, 10), drop_path_rate=0.0),
    # 10,996,972 parameters
    "tinyvit_11m": dict(embed_dims=(64, 128, 256, 448), num_heads=(2, 4, 8, 14), drop_path_rate=0.1),
    # 21,198,568 parameters (21,230,488 at 384, 21,268,120 at 512)
    "tinyvit_21m": dict(embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18), drop_path_rate=0.2),
}


def default_window_sizes(img_size: int) -> tuple[int, int, int, int]:
    """The official window sizes for an input size: the last stage's map, at least the paper's 7.

    224 -> (7, 7, 14, 7), 384 -> (12, 12, 24, 12), 512 -> (16, 16, 32, 16); smaller inputs keep
    the 224 windows, which `TransformerBlock` clips to the (smaller) feature maps.
    """
    base = max(7, img_size // 32)
    return (base, base, 2 * base, base)


def build_tinyvit(preset: str, **overrides) -> TinyViT:
    """Build a preset ("tinyvit_5m", "tinyvit_11m", "tinyvit_21m") with config fields overridden.

    Raises:
        ValueError: unknown preset, or an override that is not a `TinyViTConfig` field or is invalid.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown TinyViT preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = TinyViTConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown TinyViT config field(s) {unknown}; valid fields: {sorted(fields)}")
    kwargs = {**PRESETS[preset], **overrides}
    kwargs.setdefault("window_sizes", default_window_sizes(kwargs.get("img_size", 224)))
    return TinyViT(TinyViTConfig(**kwargs))


def tinyvit_5m(**overrides) -> TinyViT:
    """TinyViT-5M (keyword arguments override `TinyViTConfig` fields, e.g. num_classes, img_size)."""
    return build_tinyvit("tinyvit_5m", **overrides)


def tinyvit_11m(**overrides) -> TinyViT:
    """TinyViT-11M (keyword arguments override `TinyViTConfig` fields)."""
    return build_tinyvit("tinyvit_11m", **overrides)


def tinyvit_21m(**overrides) -> TinyViT:
    """TinyViT-21M (keyword arguments override `TinyViTConfig` fields)."""
    return build_tinyvit("tinyvit_21m", **overrides)


def _conv_out(size: int) -> int:
    return (size - 1) // 2 + 1  # 3x3 conv, stride 2, padding 1


def stage_resolutions(img_size: int, num_stages: int = 4) -> list[int]:
    """Side length of each stage's feature map for a square input (224 -> [56, 28, 14, 7])."""
    size = _conv_out(_conv_out(img_size))
    sizes = [size]
    for _ in range(num_stages - 1):
        size = _conv_out(size)
        sizes.append(size)
    return sizes


# ----------------------------------------------------------------------------- blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _depthwise_in_float32(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` should leave a CPU's bf16 autocast for `x`: a depthwise convolution that is
    strided or works on a map of at most 4x4. oneDNN's bf16 backward of these is many times slower
    than its fp32 one, while their forward, and the backward of stride-1 ones on larger maps, cost
    about the same or gain from bf16; they hold a tiny share of the model's FLOPs, so fp32 costs
    little. `make bench` times them ("kernels"; docs/performance.md)."""
    if conv.groups == 1 or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    if conv.weight.dtype != torch.float32:  # a bf16 (or fp64) model keeps its own precision
        return False
    return conv.stride != (1, 1) or min(x.shape[-2:]) <= 4


def _one_pixel_window(conv: nn.Conv2d, x: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The input rows and columns, ((r0, r1), (c0, c1)), under the kernel of `conv`'s only output
    pixel when `conv` maps `x` (B, C, H, W) to a 1x1 map; None for any other case."""
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if x.dim() != 4:
        return None
    spans = []
    for size, kernel, stride, pad in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding):
        if (size + 2 * pad - kernel) // stride + 1 != 1:
            return None
        spans.append((max(0, -pad), min(size, kernel - pad)))  # input index i meets kernel tap i + pad
    return spans[0], spans[1]


def _fp32_products_apply(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """What every fp32 product rule (`SmallMapConv2d`'s `small_map_conv` and `winograd_conv3x3`,
    `ConvBN`'s `small_map_depthwise` and `pointwise_conv`) needs of `conv` and its input `x`: a
    batched fp32 input and weight on a CPU outside autocast (bf16 keeps oneDNN's kernels), no
    dilation, zero padding given as numbers, a batch of at least one, and no hooks on the module
    (the products read its weight directly, so its forward hooks would not run)."""
    return (
        x.dim() == 4
        and x.shape[0] > 0
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and x.device.type == "cpu"
        and x.dtype == conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class SmallMapConv2d(nn.Conv2d):
    """`nn.Conv2d` (the same parameters and state dict) that computes a convolution on a small map
    as the matrix product it is:

    * an output of one pixel: the input pixels under the kernel times the kernel taps they meet
      (the others meet only padding), in any precision; the same function and gradients;
    * in fp32 on a CPU, an input of at most 4 pixels (a 2x2 map): `small_map_conv`, one product
      with a matrix gathered from the taps; the same function, rounding aside;
    * in fp32 on a CPU, a 3x3 convolution with stride 1 and padding 1 on a map of at most 64
      pixels with sides multiples of 4 (4x4, 8x8): `winograd_conv3x3`, fewer multiplies; the same
      function, rounding aside.

    Why: at 32x32 a ResNet works on 8x8, 4x4, 2x2 and 1x1 maps, where oneDNN's convolution kernels
    are slow on the smallest (above all the weight gradient, one small matrix product) and its
    3x3 kernels on the others already run at the fp32 matmul peak, so only less work is faster.
    `make bench` times the layers ("kernels"; docs/performance.md). Under bf16 autocast the 2x2,
    4x4 and 8x8 maps keep oneDNN's kernels. `with_small_map_convs` turns a model's convolutions
    into these; `inference_copy` turns them back, to fold BatchNorm into them. Set `small_map_products = False`
    for oneDNN's kernel on the 2x2 maps, `winograd = False` on the 4x4 and 8x8 ones."""

    small_map_products: bool = True
    winograd: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = _one_pixel_window(self, x)
        if window is not None:
            return self._one_pixel(x, window)
        if self._as_one_product(x):
            return small_map_conv(x, self.weight, self.bias, self.stride, self.padding)
        if self._as_winograd(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

    def _one_pixel(self, x: torch.Tensor, window: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
        (r0, r1), (c0, c1) = window
        pad_h, pad_w = self.padding
        pixels = x[:, :, r0:r1, c0:c1].permute(0, 2, 3, 1).flatten(1)  # (B, h * w * C_in)
        # Sliced after the permute: the slice's gradient is then laid out as a channels-last weight
        # is (a view when it is one), so the weight's gradient needs no copy into its layout.
        rows, cols = slice(r0 + pad_h, r1 + pad_h), slice(c0 + pad_w, c1 + pad_w)
        taps = self.weight.permute(0, 2, 3, 1)[:, rows, cols]  # (C_out, h, w, C_in)
        out = F.linear(pixels, taps.flatten(1), self.bias)  # (B, C_out)
        return out[:, :, None, None]  # (B, C_out, 1, 1)

    def _as_one_product(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through `small_map_conv`: a batched map of at most 4 pixels that the
        kernel fits (padding included), ungrouped, where `_fp32_products_apply`; anything else gets
        the convolution (and its errors)."""
        return (
            self.small_map_products
            and self.groups == 1
            and _fp32_products_apply(self, x)
            and x.shape[-2] * x.shape[-1] <= 4
            and all(n + 2 * p >= k for n, p, k in zip(x.shape[-2:], self.padding, self.kernel_size))
        )

    def _as_winograd(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through `winograd_conv3x3`: a map with sides that are multiples of 4 and
        at most 64 pixels (4x4, 4x8, 8x8, ...) and an ungrouped 3x3 kernel with stride 1 and padding
        1, where `_fp32_products_apply`."""
        H, W = x.shape[-2:]
        return (
            self.winograd
            and self.groups == 1
            and _fp32_products_apply(self, x)
            and H >= 4
            and W >= 4
            and H % 4 == 0
            and W % 4 == 0
            and H * W <= 64
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
        )


def with_small_map_convs(module: nn.Module, *, undo: bool = False) -> nn.Module:
    """Every plain `nn.Conv2d` in `module` made a `SmallMapConv2d` in place (the class changes, the
    parameters, buffers and hooks stay; nothing is drawn from the RNG); `undo=True` turns them back
    (torch.fx's conv + BatchNorm fusion matches plain `nn.Conv2d` only). Returns `module`."""
    source, target = (SmallMapConv2d, nn.Conv2d) if undo else (nn.Conv2d, SmallMapConv2d)
    for child in module.modules():
        if type(child) is source:
            child.__class__ = target
    return module


def _tap_index(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """(Ho * Wo, H * W) index of the kernel tap (row-major, kh * kw of them) that joins output pixel
    o to input pixel p of a `size` map, or kh * kw where no tap does. Geometry only, on the CPU: a
    fresh tensor over a cached array, so no tensor outlives the mode it was made in (inference mode,
    or the fake tensors of torch.export and torch.compile)."""
    return torch.from_numpy(_tap_index_array(*_plain_ints(size, kernel, stride, padding)))


@functools.lru_cache(maxsize=64)
def _tap_index_array(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    (H, W), (kh, kw), (sh, sw), (ph, pw) = size, kernel, stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    oy, ox = np.repeat(np.arange(Ho), Wo), np.tile(np.arange(Wo), Ho)  # (O,)
    py, px = np.repeat(np.arange(H), W), np.tile(np.arange(W), H)  # (P,)
    dy = py[None, :] - oy[:, None] * sh + ph  # (O, P) kernel row meeting input row py
    dx = px[None, :] - ox[:, None] * sw + pw
    inside = (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)
    return np.where(inside, dy * kw + dx, kh * kw).astype(np.int64)


def small_map_depthwise(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """A depthwise convolution (no bias, no dilation, zero padding) of `x` (B, C, H, W) with `weight`
    (C, 1, kh, kw), computed as what it is on a small map: each output pixel a weighted sum of the
    input pixels, with one (Ho * Wo, H * W) mixing matrix per channel gathered from the taps.

    The same function as `F.conv2d(..., groups=C)`, rounding aside: the sums run in another order
    (on a 1x1 map with the kernel centred on it, the output and the input's gradient are the same
    bits). Its cost grows with (H * W)**2, so it pays only on maps of a few pixels, where oneDNN's
    AVX2 kernels spend milliseconds on kilobytes (`ConvBN` uses it on maps of at most 4 pixels;
    `make bench`, "kernels"). Returns a channels-last (B, C, Ho, Wo). It checks nothing: its callers
    pass only what `ConvBN._small_map_product` admits (a kernel larger than the padded map
    raises from torch with a shape error)."""
    B, C, H, W = x.shape
    pair = nn.modules.utils._pair
    index = _tap_index((H, W), tuple(weight.shape[-2:]), pair(stride), pair(padding))  # (O, P)
    Ho = (H + 2 * pair(padding)[0] - weight.shape[-2]) // pair(stride)[0] + 1
    taps = torch.cat([weight.reshape(C, -1), weight.new_zeros(C, 1)], dim=1)  # (C, kh * kw + 1), last = none
    mixing = taps.t()[index.to(x.device)]  # (O, P, C)
    pixels = x.permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # (B, 1, P, C), a view when channels-last
    out = (pixels * mixing).sum(dim=2)  # (B, O, C)
    return out.view(B, Ho, -1, C).permute(0, 3, 1, 2)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution (stride 1, no bias) of `x` (B, C_in, H, W) with `weight` (C_out, C_in, 1, 1)
    as the one matrix product it is, (B * H * W, C_in) @ (C_in, C_out), on the channels-last view
    of `x`. The same function as `F.conv2d`, rounding aside (MKL's sums, not oneDNN's). On a map of
    a few pixels oneDNN's AVX2 kernels spend more time outside the arithmetic than in it, which
    `ConvBN` avoids on maps of at most 16 pixels (`make bench`, "kernels"). Returns a channels-last
    (B, C_out, H, W), whatever the layout of `x`."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1)).permute(0, 3, 1, 2)  # (B, H, W, C_out) viewed


def _tap_selector(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """(Ho * Wo * H * W, kh * kw) float 0/1 matrix: row o * H * W + p selects the tap joining output
    pixel o to input pixel p (`_tap_index`), a row of zeros where none does. A fresh tensor over a
    cached array, as `_tap_index`."""
    return torch.from_numpy(_tap_selector_array(*_plain_ints(size, kernel, stride, padding)))


def _plain_ints(*pairs: tuple) -> tuple[tuple[int, int], ...]:
    """Each pair as Python ints (a traced shape's sizes are symbolic: static ones become plain here)."""
    return tuple((int(a), int(b)) for a, b in pairs)


@functools.lru_cache(maxsize=64)
def _tap_selector_array(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    index = _tap_index_array(size, kernel, stride, padding).reshape(-1)
    taps = kernel[0] * kernel[1]
    return np.eye(taps + 1, dtype=np.float32)[index][:, :taps]


def small_map_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """An ungrouped convolution (no dilation, zero padding) of `x` (B, C_in, H, W) with `weight`
    (C_out, C_in, kh, kw), computed as what it is on a small map: one matrix product of the
    (B, H * W * C_in) pixels with a (Ho * Wo * C_out, H * W * C_in) matrix whose blocks are the taps
    joining each output pixel to each input pixel (zeros where none does). The matrix is built by a
    product with a 0/1 tap selector (`_tap_selector`), so its gradient reaches the taps as a product
    too, in the weight's channels-last layout when it has one.

    The same function as `F.conv2d`, rounding aside (the sums run in another order). It does
    (H * W) * (Ho * Wo) pixel pairs' work where the convolution does Ho * Wo * kh * kw, so it pays only
    on maps of a few pixels: on a 2x2 map with a 3x3 kernel, 16 pairs against 36 taps, 9 of them
    padding (`SmallMapConv2d` uses it on maps of at most 4 pixels). Returns a channels-last
    (B, C_out, Ho, Wo). It checks nothing: its caller passes only what
    `SmallMapConv2d._as_one_product` admits (a kernel larger than the padded map raises from torch)."""
    B, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    pair = nn.modules.utils._pair
    selector = _tap_selector((H, W), (kh, kw), pair(stride), pair(padding)).to(x.device)  # (O * P, kh * kw)
    outputs = selector.shape[0] // (H * W)  # Ho * Wo
    taps = weight.permute(0, 2, 3, 1).reshape(C_out, kh * kw, C)  # (C_out, kh * kw, C_in), a view if channels-last
    matrix = (selector @ taps).view(C_out, outputs, H * W * C).transpose(0, 1).reshape(outputs * C_out, H * W * C)
    pixels = x.permute(0, 2, 3, 1).reshape(B, H * W * C)  # (B, P * C_in)
    out = F.linear(pixels, matrix, None if bias is None else bias.repeat(outputs))  # (B, Ho * Wo * C_out)
    Ho = (H + 2 * pair(padding)[0] - kh) // pair(stride)[0] + 1
    return out.view(B, Ho, -1, C_out).permute(0, 3, 1, 2)


# Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", CVPR 2016): a 6x6 input tile gives a 4x4 output tile of a 3x3 convolution as
# A^T [(G g G^T) * (B^T d B)] A, 36 products per channel pair where the convolution does 144.
_WINOGRAD_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_WINOGRAD_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@functools.lru_cache(maxsize=16)
def _winograd_arrays(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float32 transforms of `winograd_conv3x3` on a `size` map of T = (H / 4) * (W / 4) tiles:
    the input's (36 * T, H * W), which gathers each tile's 6x6 pixels (padding 1 folded in: the
    taps that meet it are left out) and transforms them, row e * T + t for element e of tile t;
    the kernel's (36, 9); the output's (H * W, 36 * T), which transforms each tile back and puts
    its 4x4 pixels in place."""
    H, W = size
    bt, g, at = (np.array(m, dtype=np.float64) for m in (_WINOGRAD_BT, _WINOGRAD_G, _WINOGRAD_AT))
    to_elements, to_pixels = np.kron(bt, bt), np.kron(at, at)  # (36, 36 tile pixels), (16, 36)
    tiles = [(ty, tx) for ty in range(H // 4) for tx in range(W // 4)]
    gather = np.zeros((36 * len(tiles), H * W))
    scatter = np.zeros((H * W, 36 * len(tiles)))
    for t, (ty, tx) in enumerate(tiles):
        for i, j in np.ndindex(6, 6):  # tile pixel (i, j) is map pixel (4 ty + i - 1, 4 tx + j - 1)
            r, c = 4 * ty + i - 1, 4 * tx + j - 1
            if 0 <= r < H and 0 <= c < W:
                gather[t :: len(tiles), r * W + c] = to_elements[:, i * 6 + j]
        for i, j in np.ndindex(4, 4):
            scatter[(4 * ty + i) * W + 4 * tx + j, t :: len(tiles)] = to_pixels[i * 4 + j]
    return gather.astype(np.float32), np.kron(g, g).astype(np.float32), scatter.astype(np.float32)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution (stride 1, padding 1, ungrouped) of `x` (B, C_in, H, W) with `weight`
    (C_out, C_in, 3, 3) by Winograd's F(4x4, 3x3): each 6x6 input tile and each kernel transformed,
    36 batched products over the channels, each output tile transformed back. The transforms are
    matrix products too (`_winograd_arrays`: one matrix cuts the map into overlapping 6x6 tiles,
    the pixels outside it taken as zeros, and transforms them), so the forward pass is four matrix
    products and two layout copies, and the backward autograd's products through them.

    The same function as `F.conv2d(x, weight, bias, padding=1)`, rounding aside: the transforms'
    entries (from 1/576 to 64) make its error against float64 several times oneDNN's (on a
    64-channel 8x8 layer about 4e-5 against 5e-6, on outputs up to about 5), still fp32 rounding.
    The channel products do a quarter of the convolution's multiplies; the dense transforms add
    work that grows with the map's pixels squared, so that in all it does about 31% of the
    convolution's multiplies on a 128-channel 4x4 map and 75% on a 64-channel 8x8 one (applying
    the 1-D transforms along each side in turn would cost less). Returns a channels-last
    (B, C_out, H, W). It checks nothing: H and W must be positive multiples of 4
    (`SmallMapConv2d._as_winograd`)."""
    B, C, H, W = x.shape
    C_out = weight.shape[0]
    gather, kernel, scatter = (torch.from_numpy(a).to(x.device) for a in _winograd_arrays((int(H), int(W))))
    tiles = gather.shape[0] // 36
    pixels = x.permute(2, 3, 0, 1).reshape(H * W, B * C)  # (P, B * C_in)
    elements = (gather @ pixels).view(36, tiles * B, C)  # (36, T * B, C_in)
    taps = (kernel @ weight.permute(2, 3, 1, 0).reshape(9, C * C_out)).view(36, C, C_out)  # (36, C_in, C_out)
    products = torch.bmm(elements, taps)  # (36, T * B, C_out)
    out = (scatter @ products.view(36 * tiles, B * C_out)).view(H, W, B, C_out)  # (H, W, B, C_out)
    out = out.permute(2, 0, 1, 3).contiguous()  # (B, H, W, C_out)
    if bias is not None:
        out = out + bias
    return out.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm ('same' padding for odd kernels).

    In fp32 on a CPU, two convolutions on small maps run as the matrix products they are: a
    depthwise one on a map of at most 4 pixels as `small_map_depthwise`, and a 1x1 one (stride 1,
    ungrouped) on a map of at most 16 pixels as `pointwise_conv`. Set `small_map_products = False`
    for oneDNN's kernels throughout."""

    small_map_products: bool = True

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _depthwise_in_float32(self.conv, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        product = self._small_map_product(x)
        if product == "pointwise":
            return self.bn(pointwise_conv(x, self.conv.weight))
        if product == "depthwise":
            return self.bn(small_map_depthwise(x, self.conv.weight, self.conv.stride, self.conv.padding))
        return super().forward(x)

    def _small_map_product(self, x: torch.Tensor) -> str | None:
        """The matrix product that computes this convolution on `x`, if one does: in fp32 on a CPU
        (bf16 autocast keeps its own rule, `_depthwise_in_float32`), "pointwise" for a 1x1,
        stride-1, ungrouped convolution on a map of at most 16 pixels (`pointwise_conv`; on 8x8 maps
        it gained nothing), "depthwise" for a depthwise one on a map of at most 4 (`small_map_depthwise`);
        else None (oneDNN's kernel)."""
        conv = self.conv
        if not (self.small_map_products and conv.bias is None and _fp32_products_apply(conv, x)):
            return None
        pixels = x.shape[-2] * x.shape[-1]
        if conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1 and pixels <= 16:
            return "pointwise"
        if conv.groups == conv.in_channels == conv.out_channels and pixels <= 4:
            return "depthwise"
        return None

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        """One Conv2d computing the same as this module in eval mode (BN folded into the conv)."""
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
        ).to(conv.weight)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class PatchEmbed(nn.Module):
    """Two 3x3 stride-2 ConvBN with a GELU between: (B, in_chans, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chans, dim // 2, 3, stride=2)
        self.act = nn.GELU()
        self.conv2 = ConvBN(dim // 2, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted bottleneck (MobileNetV2): 1x1 expand, 3x3 depthwise, 1x1 project, residual.

    The projection's BN starts at zero, so each block starts as the identity (then GELU).
    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1 ConvBN, 3x3 depthwise stride-2 ConvBN, 1x1 ConvBN.

    (B, in_dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_dim, out_dim, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=2, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def relative_bias_index(grid_h: int, grid_w: int, table_side: int, device: torch.device | None = None) -> torch.Tensor:
    """(N, N) indices into a bias table of table_side**2 offsets, for a grid_h x grid_w window.

    Token i at (y_i, x_i) attending to token j reads entry |y_i - y_j| * table_side + |x_i - x_j|:
    one learned value per absolute offset (the offset order of the official implementation).
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * table_side + dx  # (N, N)


class Attention(nn.Module):
    """Multi-head self-attention over one window, pre-normed, with a learned relative bias.

    `attention_biases` holds (num_heads, window_size**2) values, one per head and per absolute
    offset (dy, dx) inside a window. A window smaller than `window_size` (a feature map smaller
    than the window) reads the subset of offsets it contains. (B, N, dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        # Output features are grouped per head as [q, k, v] (the official layout).
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Index for the window this block expects at its configured resolution; other window
        # shapes are indexed on the fly. It is geometry only, never a copy of learned values,
        # so loading weights or moving devices cannot leave it stale.
        self.grid = grid or (window_size, window_size)
        self.register_buffer("bias_index", relative_bias_index(*self.grid, window_size), persistent=False)

    def attention_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        """(num_heads, N, N) bias for a grid_h x grid_w window."""
        index = (
            self.bias_index
            if grid == self.grid
            else relative_bias_index(*grid, self.window_size, device=self.attention_biases.device)
        )
        return self.attention_biases[:, index]

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        grid = grid or self.grid
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each (B, heads, N, head_dim)
        bias = self.attention_bias(grid).to(q.dtype)  # (heads, N, N), broadcast over B
        if x.device.type == "cpu":
            # Written out: on a CPU, scaled_dot_product_attention with a float mask takes its math path
            # plus checks for fully masked rows (isneginf, all, where); this form is the same
            # arithmetic without them.
            # Under bf16 autocast the scores leave the matmul in bf16; the bias and the softmax run
            # in float32 (a no-op in fp32), as the fused kernels accumulate.
            attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).float() + bias.float()  # (B, heads, N, N)
            x = attn.softmax(dim=-1).to(v.dtype) @ v
        else:  # fused kernels on GPUs
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TransformerBlock(nn.Module):
    """TinyViT block on (B, H, W, C): window attention, 3x3 depthwise ConvBN, MLP, residuals.

    The window is min(window_size, H) x min(window_size, W): a map that fits in one window is
    attended as a whole, without padding. A larger map whose side is not a multiple of the
    window is zero-padded to one, as in the official implementation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path: float = 0.0,
        resolution: int | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        grid = None if resolution is None else self.window_grid(resolution, resolution)
        self.attn = Attention(dim, num_heads, window_size, grid)
        self.drop_path = DropPath(drop_path)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def window_grid(self, H: int, W: int) -> tuple[int, int]:
        return min(self.window_size, H), min(self.window_size, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_grid(H, W)
        pad_b, pad_r = (-H) % wh, (-W) % ww
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        Hp, Wp = H + pad_b, W + pad_r
        nh, nw = Hp // wh, Wp // ww
        # window partition: (B, Hp, Wp, C) -> (B * nh * nw, wh * ww, C)
        y = y.view(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, wh * ww, C)
        y = self.attn(y, (wh, ww))
        # window reverse: -> (B, Hp, Wp, C), then drop the padding
        y = y.view(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)[:, :H, :W]
        x = x + self.drop_path(y)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv in (B, C, H, W)
        return x + self.drop_path(self.mlp(x))


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks at stride 4. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, drop_paths: list[float]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MBConv(dim, expand_ratio, p) for p in drop_paths[:depth]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class TransformerStage(nn.Module):
    """PatchMerging, then TransformerBlocks. (B, in_dim, H, W) -> (B, dim, H/2, W/2)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        *,
        mlp_ratio: float,
        local_conv_size: int,
        drop_paths: list[float],
        resolution: int,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim)
        self.blocks = nn.Sequential(
            *(
                TransformerBlock(
                    dim,
                    num_heads,
                    window_size,
                    mlp_ratio=mlp_ratio,
                    local_conv_size=local_conv_size,
                    drop_path=p,
                    resolution=resolution,
                )
                for p in drop_paths[:depth]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # (B, H, W, C): the blocks work channels-last
        return self.blocks(x).permute(0, 3, 1, 2)


class ClassifierHead(nn.Module):
    """Global average pool, LayerNorm, Linear. (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)


# ----------------------------------------------------------------------------- model


class TinyViT(nn.Module):
    """TinyViT built from one `TinyViTConfig` (see the module docstring for the layout)."""

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TinyViTConfig()
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        resolutions = stage_resolutions(cfg.img_size, len(cfg.depths))

        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dims[0])
        stages: list[nn.Module] = [
            ConvStage(cfg.embed_dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, rates[: cfg.depths[0]])
        ]
        for i in range(1, len(cfg.depths)):
            stages.append(
                TransformerStage(
                    cfg.embed_dims[i - 1],
                    cfg.embed_dims[i],
                    cfg.depths[i],
                    cfg.num_heads[i],
                    cfg.window_sizes[i],
                    mlp_ratio=cfg.mlp_ratio,
                    local_conv_size=cfg.local_conv_size,
                    drop_paths=rates[starts[i] :],
                    resolution=resolutions[i],
                )
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = cfg.embed_dims[-1]
        self.head = ClassifierHead(self.num_features, cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments that AdamW should not decay (besides norms and biases)."""
        return {"attention_biases"}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a fresh one for `num_classes` (0 = features only)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        weight = self.head.norm.weight  # the new head on the model's device and in its dtype
        self.head.fc = (
            nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
            if num_classes
            else nn.Identity()
        )
        if num_classes:
            self._init_weights(self.head.fc)
        self.config = replace(self.config, num_classes=num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"TinyViT expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"TinyViT was built for in_chans={self.config.in_chans} but the input has {x.shape[1]} "
                f"channels (shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} or convert the images"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dims[-1], H/32, W/32)."""
        self._check_input(x)
        # Channels-last from the first convolution on: the attention stages work on (B, H, W, C)
        # anyway, so each stage boundary is a free permute instead of a copy, and oneDNN's
        # convolution and BatchNorm kernels are faster in this layout.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- weights


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official (microsoft/Cream) TinyViT state dict to this model's (= timm's) keys.

    Official layers hold their PatchMerging at the end (`layers.i.downsample`); here it opens the
    next stage (`stages.{i+1}.downsample`). Conv2d_BN's `.c.` is `.conv.`; `norm_head` and `head`
    are `head.norm` and `head.fc`.
    """
    out = {}
    for key, value in state_dict.items():
        k = re.sub(r"(^|\.)c\.", r"\1conv.", key)
        k = k.replace("patch_embed.seq.0.", "patch_embed.conv1.").replace("patch_embed.seq.2.", "patch_embed.conv2.")
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", k)
        k = re.sub(r"^layers\.", "stages.", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        k = re.sub(r"^norm_head\.", "head.norm.", k)
        out[k] = value
    return out


def ours_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `official_to_ours`: export our weights under the official key names."""
    out = {}
    for key, value in state_dict.items():
        k = re.sub(r"^head\.norm\.", "norm_head.", key)
        k = re.sub(r"^head\.fc\.", "head.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"^stages\.", "layers.", k)
        k = k.replace("patch_embed.conv1.", "patch_embed.seq.0.").replace("patch_embed.conv2.", "patch_embed.seq.2.")
        k = re.sub(r"(^|\.)conv\.", r"\1c.", k)
        out[k] = value
    return out


def resize_attention_biases(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Resize a (heads, s*s) bias table to (heads, window_size**2), bicubic over the (s, s) grid.

    Raises:
        ValueError: the table is not a square grid of offsets.
    """
    heads, n = table.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attention bias table of shape {tuple(table.shape)} is not a square grid of offsets")
    grid = table.float().view(1, heads, side, side)
    grid = F.interpolate(grid, size=(window_size, window_size), mode="bicubic", align_corners=False)
    return grid.view(heads, window_size * window_size).to(table.dtype)


def _read_checkpoint(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        return load_checkpoint(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    raise ValueError(f"unsupported checkpoint format {suffix!r} for {path}; use .pth, .pt or .safetensors")


def _name(source) -> str:
    return "(in memory)" if isinstance(source, Mapping) else str(source)


def read_weights(source) -> Mapping[str, torch.Tensor]:
    """The state dict in a checkpoint file (`.pth`/`.pt` read with weights_only, or `.safetensors`),
    unwrapped from `{'model': ...}` or `{'state_dict': ...}`, key names as they are in the file.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read, or holds no mapping of names to tensors (it names what
            it holds).
    """
    loaded = _read_checkpoint(source)
    state = _unwrap(loaded) if isinstance(loaded, Mapping) else None
    if state is None or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {_name(source)} holds a {type(loaded).__name__}, not a state dict of tensors")
    return state


def _unwrap(obj: Mapping) -> Mapping[str, torch.Tensor]:
    for wrapper in ("model", "state_dict", "model_state"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return _unwrap(obj[wrapper])
    return obj


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first convolution's weight (O, C, kh, kw) for `in_chans` input channels: summed over RGB for 1
    channel, a grayscale one repeated and divided by 3 for 3 (so a gray image gives the same output).

    Raises:
        ValueError: any other change of channel count.
    """
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if (have, in_chans) == (3, 1):
        return weight.sum(dim=1, keepdim=True)
    if (have, in_chans) == (1, 3):
        return weight.repeat(1, 3, 1, 1) / 3
    raise ValueError(f"cannot adapt a first convolution of {have} input channels to {in_chans}")


def state_dict_problems(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into a model whose state dict is `target` (empty: it fits).

    Checked before loading, so a checkpoint that does not fit never leaves a half-loaded model.
    """
    problems = []
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    for key in sorted(set(state) & set(target)):
        if state[key].shape != target[key].shape:
            problems.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(target[key].shape)}")
    return problems


def _fit_attention_biases(attention: nn.Module, table: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """A checkpoint's bias table (heads, s*s) for `attention`'s (heads, w*w). A table of the block's
    clipped window (s = the window this block attends over, below w: what `export.timm_state_dict`
    writes, or a model trained at that window) holds exactly the offsets the block reads: it fills
    their corner of the table (the offsets it never reads keep `current`'s values). Any other size is
    resized bicubically, as the official loader does."""
    heads, window = table.shape[0], attention.window_size
    side, clipped = math.isqrt(table.shape[1]), min(window, *attention.grid)
    if side * side == table.shape[1] and side == clipped < window:
        full = current.detach().clone().view(heads, window, window)
        full[:, :side, :side] = table.view(heads, side, side)
        return full.reshape(heads, window * window)
    return resize_attention_biases(table, math.isqrt(current.shape[1]))


def load_pretrained(model: TinyViT, source, *, skip_head: bool = False, adapt_in_chans: bool = False) -> TinyViT:
    """Load TinyViT weights from a path or a state dict into `model`, in place, and return it.

    Accepts `.pth`/`.pt` (read with `weights_only=True`) or `.safetensors` files, or a state dict
    already in memory; official Cream key names or timm's (= ours), optionally wrapped in
    `{'model': ...}`. Attention-bias tables trained at another window size are resized bicubically
    (as the official loader does). With `skip_head=True` the classifier weights are not loaded
    (fine-tuning to another class count). With `adapt_in_chans=True` a first convolution trained on
    RGB is summed over its input channels for a grayscale model (and a grayscale one repeated / 3 for
    RGB), as timm adapts its input convolution: the same response to a gray image.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read, or its tensors do not fit the model (missing or
            unexpected keys, other shapes: e.g. a checkpoint of another variant). Nothing is
            loaded in that case.
    """
    loaded = _read_checkpoint(source)
    state = _unwrap(loaded) if isinstance(loaded, Mapping) else None
    if state is None or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {_name(source)} holds a {type(loaded).__name__}, not a state dict of tensors")
    if any(k.startswith(("layers.", "norm_head.")) for k in state):
        state = official_to_ours(state)
    state = {
        k: v for k, v in state.items() if not k.endswith(("attention_bias_idxs", "bias_index", "attention_bias_cache"))
    }
    target = model.state_dict()
    if skip_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        state.update({k: v for k, v in target.items() if k.startswith("head.fc.")})
    first = "patch_embed.conv1.conv.weight"
    if adapt_in_chans and first in state and first in target:
        state[first] = adapt_input_conv(state[first], target[first].shape[1])

    for key in set(state) & set(target):
        have, want = state[key].shape, target[key].shape
        if key.endswith("attention_biases") and have != want and have[0] == want[0]:
            state[key] = _fit_attention_biases(model.get_submodule(key.rsplit(".", 1)[0]), state[key], target[key])
    problems = state_dict_problems(target, state)
    if problems:
        if any(p.startswith("head.fc.") for p in problems):
            problems.append("pass skip_head=True to keep the model's new head")
        raise ValueError(
            "checkpoint does not fit this TinyViT "
            f"(embed_dims={model.config.embed_dims}, depths={model.config.depths}, "
            f"num_classes={model.config.num_classes}): " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- analysis


def count_flops(
    model: nn.Module, img_size: int | None = None, *, in_chans: int | None = None, per_module: bool = False
):
    """Forward FLOPs for one image (multiply-adds count 2; MACs = FLOPs / 2).

    With `per_module=True` also returns {module name: FLOPs} for every submodule.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = getattr(model, "config", None)
    img_size = img_size or cfg.img_size
    in_chans = in_chans or cfg.in_chans
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    # The math kernel is dispatched through countable matmuls on every backend.
    with torch.no_grad(), counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        model(x)
    model.train(was_training)
    total = counter.get_total_flops()
    if not per_module:
        return total
    # The counter names modules "<RootClass>.<path>"; strip the root to get state-dict style names.
    per_module = {
        name.partition(".")[2]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name
    }
    return total, per_module


def fuse_for_inference(model: TinyViT) -> nn.Module:
    """A copy of `model` in eval mode with every ConvBN folded into a single Conv2d.

    Outputs equal the original's in eval mode (up to float rounding); the copy cannot train.
    """
    fused = copy.deepcopy(model).eval()
    for _name, module in list(fused.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ConvBN):
                setattr(module, child_name, child.fused())
    return fused


def inference_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of any model for inference: eval mode, every BatchNorm folded into the
    convolution before it, weights channels-last. TinyViT folds its ConvBNs (`fuse_for_inference`);
    another model (a torchvision teacher) goes through torch.fx's conv + BatchNorm fusion where it
    traces, and is only copied where it does not. Outputs equal `model.eval()`'s up to float rounding.
    `model` and the global RNG are left as they were (building the folded convolutions would draw
    their throw-away initial weights from it, and move a training run's drop path)."""
    with torch.random.fork_rng(devices=[]):
        if isinstance(model, TinyViT):
            folded = fuse_for_inference(model)
        else:
            from torch.fx.experimental.optimization import fuse

            folded = with_small_map_convs(copy.deepcopy(model).eval(), undo=True)
            try:
                folded = fuse(folded)
            except Exception:  # noqa: BLE001 -- any model fx cannot trace runs unfused
                pass
    return folded.requires_grad_(False).to(memory_format=torch.channels_last)
