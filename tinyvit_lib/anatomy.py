"""Looking inside a TinyViT: shapes of each block, parameters and compute per stage, windows.

Pure functions of a model (no training, no data); notebook 01 prints and plots what they return.
"""

from __future__ import annotations

import math

import torch

from .model import (
    PRESETS,
    Attention,
    ClassifierHead,
    MBConv,
    Mlp,
    PatchEmbed,
    PatchMerging,
    TinyViT,
    TransformerBlock,
    build_tinyvit,
    count_flops,
    stage_resolutions,
)

__all__ = ["layer_shapes", "stage_costs", "variant_table", "window_table", "format_table"]

BLOCK_TYPES = (PatchEmbed, MBConv, PatchMerging, TransformerBlock, Attention, Mlp, ClassifierHead)


def layer_shapes(model: TinyViT, x: torch.Tensor) -> list[dict]:
    """Input and output shape of the first block of each kind, in the order they run."""
    rows: list[dict] = []
    seen: set[type] = set()

    def hook(name):
        def record(module, args, output):
            if type(module) in seen:
                return
            seen.add(type(module))
            rows.append(
                dict(
                    block=type(module).__name__,
                    name=name,
                    input=tuple(args[0].shape),
                    output=tuple(output.shape),
                    params=sum(p.numel() for p in module.parameters()),
                )
            )

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, BLOCK_TYPES)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return rows


def stage_costs(model: TinyViT, img_size: int | None = None) -> list[dict]:
    """Parameters and forward FLOPs of the stem, each stage and the head, at `img_size`."""
    img_size = img_size or model.config.img_size
    _, per_module = count_flops(model, img_size, per_module=True)
    maps = stage_resolutions(img_size, len(model.stages))
    parts = [("stem", "patch_embed", model.patch_embed, maps[0])]
    parts += [(f"stage {i}", f"stages.{i}", s, maps[i]) for i, s in enumerate(model.stages)]
    parts += [("head", "head", model.head, 1)]
    return [
        dict(
            part=label,
            map=f"{side}x{side}",
            params=sum(p.numel() for p in module.parameters()),
            flops=per_module.get(name, 0),
        )
        for label, name, module, side in parts
    ]


def variant_table(img_sizes: tuple[int, ...] = (224, 32), *, num_classes: int = 1000, in_chans: int = 3) -> list[dict]:
    """Parameters and forward MACs of 5M/11M/21M built at each size (windows as the factories choose)."""
    rows = []
    for preset in PRESETS:
        row: dict = dict(model=preset)
        for size in img_sizes:
            with torch.device("meta"):  # shapes only: no memory, no initialisation, instant
                model = build_tinyvit(preset, img_size=size, num_classes=num_classes, in_chans=in_chans)
            row[f"params@{size}"] = sum(p.numel() for p in model.parameters())
            row[f"GMACs@{size}"] = round(count_flops(model) / 2e9, 3)
        rows.append(row)
    return rows


def window_table(model: TinyViT, img_size: int | None = None) -> list[dict]:
    """Per attention stage: map, configured window, window used, and tokens a fixed window would pad to.

    `tokens` is what attention sees here (the map, cut into windows no larger than it);
    `tokens_fixed_window` is what a fixed `window_size` window sees after zero padding (timm, official).
    """
    img_size = img_size or model.config.img_size
    maps = stage_resolutions(img_size, len(model.stages))
    rows = []
    for i, stage in enumerate(model.stages):
        if i == 0:
            continue
        block: TransformerBlock = stage.blocks[0]
        side, ws = maps[i], block.window_size
        wh, ww = block.window_grid(side, side)
        padded = math.ceil(side / ws) * ws
        rows.append(
            dict(
                stage=i,
                map=f"{side}x{side}",
                window_size=ws,
                window_used=f"{wh}x{ww}",
                windows=math.ceil(side / wh) * math.ceil(side / ww),
                tokens=side * side,
                tokens_fixed_window=padded * padded,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned plain-text table (integers with thousands separators)."""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v) -> str:
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r[c]).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
