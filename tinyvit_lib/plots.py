"""The course's figures: pure functions from results (tables, tensors) to matplotlib figures.

`save_figure` writes PNGs without the software/date metadata, so re-running a notebook with the
same results leaves the files byte-identical and git clean.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch

__all__ = [
    "save_figure",
    "plot_stage_costs",
    "plot_attention_biases",
    "plot_bias_index",
    "plot_curves",
    "plot_topk_mass",
    "plot_storage",
    "plot_views_with_predictions",
    "plot_sweep_heatmap",
    "plot_xy",
    "plot_sweep_series",
    "plot_distributions",
    "plot_conditions",
    "plot_patience",
]


def save_figure(fig: plt.Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Save `fig` as a PNG with stable bytes (no Software metadata) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def plot_stage_costs(rows_by_size: dict[int, list[dict]], title: str = "") -> plt.Figure:
    """Bars of parameters and forward FLOPs per part (stem, stages, head), one FLOP panel per size.

    `rows_by_size` maps an input size to `anatomy.stage_costs` rows; parameters do not depend
    on the size, so they are drawn once.
    """
    sizes = list(rows_by_size)
    fig, axes = plt.subplots(1, 1 + len(sizes), figsize=(4.2 * (1 + len(sizes)), 3.4))
    first = rows_by_size[sizes[0]]
    labels = [r["part"] for r in first]
    axes[0].bar(labels, [r["params"] / 1e6 for r in first], color="tab:blue")
    axes[0].set_ylabel("parameters (M)")
    axes[0].set_title("parameters")
    for ax, size in zip(axes[1:], sizes):
        rows = rows_by_size[size]
        total = sum(r["flops"] for r in rows)
        ax.bar(labels, [r["flops"] / 2e6 for r in rows], color="tab:orange")
        ax.set_ylabel("forward MMACs")
        ax.set_title(f"compute at {size}x{size} (total {total / 2e6:,.0f} MMACs)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_biases(attention_biases: torch.Tensor, title: str = "") -> plt.Figure:
    """One panel per head: the learned bias for each offset (|dy|, |dx|) inside a window.

    `attention_biases` is an `Attention.attention_biases` table of shape (heads, window**2).
    """
    table = attention_biases.detach().float().cpu()
    heads, n = table.shape
    side = math.isqrt(n)
    cols = min(heads, 5)
    rows = math.ceil(heads / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.4), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h >= heads:
            continue
        limit = table[h].abs().max().item() or 1.0
        im = ax.imshow(table[h].view(side, side), cmap="coolwarm", vmin=-limit, vmax=limit)  # zero is white
        ax.set_title(f"head {h}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "learned attention bias by offset (row: |dy|, column: |dx|)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_bias_index(index: torch.Tensor, grid: tuple[int, int], title: str = "") -> plt.Figure:
    """The (N, N) offset index of a window: which bias-table entry each query/key pair reads.

    Left: the whole matrix (query row, key column). Right: the entries read by the centre query,
    laid out on the window grid: symmetric, since the bias depends on |dy| and |dx| only.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].imshow(index.cpu(), cmap="viridis")
    axes[0].set_xlabel("key token")
    axes[0].set_ylabel("query token")
    axes[0].set_title(f"bias-table entry per pair ({index.shape[0]} tokens)")
    centre = (grid[0] // 2) * grid[1] + grid[1] // 2
    im = axes[1].imshow(index[centre].view(*grid).cpu(), cmap="viridis")
    for (y, x), v in zip(
        torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1])).tolist(), index[centre].tolist()
    ):
        axes[1].text(x, y, str(v), ha="center", va="center", fontsize=7, color="white")
    axes[1].set_title(f"entries read by the centre token ({centre}), on the grid")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(histories: dict[str, list[dict]], title: str = "") -> plt.Figure:
    """Training loss and validation top-1 per epoch, one line per run (records from log.jsonl)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, history in histories.items():
        epochs = [r["epoch"] for r in history]
        ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3, label=label)
        if all("top1" in r for r in history):
            ax_acc.plot(epochs, [r["top1"] for r in history], marker="o", ms=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation top-1 (%)")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_softened(
    logits: torch.Tensor, temperatures: list[float], label: int, classes: list[str], *, title: str = ""
) -> plt.Figure:
    """One teacher's logit vector (C,) softened at each temperature (softmax(z / T)) beside the one-hot
    label: what the student is asked to match, and what plain training asks."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    count = len(temperatures) + 1
    width = 0.8 / count
    x = torch.arange(len(classes)).float()
    onehot = torch.zeros(len(classes))
    onehot[label] = 1.0
    ax.bar(x - 0.4 + width / 2, onehot, width, color="black", label="one-hot label")
    for i, temperature in enumerate(temperatures, start=1):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        ax.bar(x - 0.4 + width * (i + 0.5), probs, width, label=f"teacher, T = {temperature:g}")
    ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("probability")
    ax.set_title(title or "the teacher's distribution at three temperatures", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_topk_mass(ks: list[int], mass_by_temperature: dict[float, list[float]]) -> plt.Figure:
    """Mean share of the teacher's probability held by its k largest classes, per temperature."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for temperature, mass in mass_by_temperature.items():
        ax.plot(ks, [100 * m for m in mass], marker="o", ms=3, label=f"T = {temperature:g}")
    ax.set_xlabel("k (logits kept per image)")
    ax.set_ylabel("teacher probability captured (%)")
    ax.set_title("how much of the teacher's distribution the top k hold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_topk_fidelity(rows: list[dict]) -> plt.Figure:
    """Mean total variation between the teacher's distribution and the one its k-record rebuilds,
    against k, one line per temperature (`distill.topk_fidelity` rows)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for temperature in dict.fromkeys(r["temperature"] for r in rows):
        mine = [r for r in rows if r["temperature"] == temperature]
        ax.plot([r["k"] for r in mine], [r["tv"] for r in mine], marker="o", ms=3, label=f"T = {temperature:g}")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("k (logits kept per record)")
    ax.set_ylabel("total variation, teacher vs rebuilt")
    ax.set_title("how far a k-record is from the teacher's distribution", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_storage(rows: list[dict]) -> plt.Figure:
    """Horizontal bars of bytes per image for each way of storing the teacher's output."""
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(rows) + 1.2))
    labels = [r["format"] for r in rows]
    values = [r["bytes_per_image"] for r in rows]
    ax.barh(labels, values, color="tab:green")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes per image (one epoch)")
    ax.set_xlim(0, max(values) * 1.25)
    fig.tight_layout()
    return fig


def plot_split(parts: dict[str, int], *, title: str = "") -> plt.Figure:
    """The course's split as one bar: each part's share of the images, in order (e.g. validation
    carve, pool, labelled set inside the pool, test), with its size written on it. A part whose name
    starts with "  " is drawn as a band inside the part before it (the labelled set is part of the
    pool)."""
    fig, ax = plt.subplots(figsize=(8, 2.6))
    total = sum(size for name, size in parts.items() if not name.startswith("  "))
    end, outer_start = 0, 0  # where the bar ends; where the last outer part began
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, size in parts.items():
        inner = name.startswith("  ")
        start = outer_start if inner else end
        height, y = (0.35, -0.5) if inner else (0.6, 0.0)
        ax.barh(y, size, left=start, height=height, color=next(colors), edgecolor="white")
        label = f"{name.strip()}\n{size:,}"
        if size > 0.15 * total:  # wide enough to hold its label
            ax.text(start + size / 2, y, label, ha="center", va="center", fontsize=7, color="white")
        elif inner:  # below its band
            ax.text(start + size / 2, y - height / 2 - 0.05, label, ha="center", va="top", fontsize=7)
        else:  # above its part
            ax.text(start + size / 2, y + height / 2 + 0.05, label, ha="center", va="bottom", fontsize=7)
        if not inner:
            outer_start, end = end, end + size
    ax.set_yticks([])
    ax.set_ylim(-1.15, 0.75)  # room for the labels above and below the bars
    ax.set_xlabel("images")
    ax.set_title(title or "the split", fontsize=10, pad=14)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_views_with_predictions(
    images: torch.Tensor, probs: torch.Tensor, classes: list[str], labels: list[int], titles: list[str] | None = None
) -> plt.Figure:
    """Each image (as the student sees it, normalised values rescaled) beside the teacher's distribution."""
    n = images.shape[0]
    fig, axes = plt.subplots(n, 2, figsize=(8, 1.9 * n), gridspec_kw=dict(width_ratios=[1, 2.2]), squeeze=False)
    for i in range(n):
        _show_image(axes[i, 0], images[i])
        axes[i, 0].set_title(titles[i] if titles else f"label: {classes[labels[i]]}", fontsize=8)
        colors = ["tab:orange" if c == labels[i] else "tab:blue" for c in range(len(classes))]
        axes[i, 1].bar(range(len(classes)), probs[i].cpu(), color=colors)
        axes[i, 1].set_ylim(0, 1)
        axes[i, 1].set_xticks(range(len(classes)))
        axes[i, 1].set_xticklabels([c[:8] for c in classes], rotation=45, fontsize=7, ha="right")
    fig.tight_layout()
    return fig


def plot_sweep_heatmap(
    rows: list[dict],
    temperatures: list[float],
    alphas: list[float],
    *,
    baseline: float | None = None,
    metric: str = "top1",
) -> plt.Figure:
    """`metric` for each (temperature, alpha) cell; the baseline's value marked in the colour bar."""
    grid = torch.full((len(temperatures), len(alphas)), float("nan"))
    for r in rows:
        if r["temperature"] in temperatures and r["alpha"] in alphas:
            grid[temperatures.index(r["temperature"]), alphas.index(r["alpha"])] = r[metric]
    fig, ax = plt.subplots(figsize=(1.3 * len(alphas) + 2.5, 0.9 * len(temperatures) + 1.6))
    values = grid[~grid.isnan()].tolist() + ([baseline] if baseline is not None else [])
    low, high = min(values), max(values)
    pad = 0.05 * max(high - low, 1e-3)
    low, high = low - pad, high + pad
    im = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high)  # the range holds the baseline, so its line shows
    for i in range(len(temperatures)):
        for j in range(len(alphas)):
            value = grid[i, j].item()
            versus = "" if baseline is None else f"\n({value - baseline:+.2f})"
            label = "" if value != value else f"{value:.2f}" + versus
            bright = value == value and (value - low) / max(high - low, 1e-9) > 0.6  # viridis turns yellow
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_xlabel("alpha (weight of the teacher term)")
    ax.set_ylabel("temperature T")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(f"{metric.replace('_', ' ')} (%)")
    if baseline is not None:
        bar.ax.axhline(baseline, color="red", lw=2)
        ax.set_title(f"distilled TinyViT-5M; labels only {baseline:.2f}% (red line, and in brackets)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_xy(
    rows: list[dict],
    x: str,
    y: str,
    *,
    label: str | None = None,
    group: str | None = None,
    baseline: float | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    title: str = "",
) -> plt.Figure:
    """One point per row (y against x), annotated with `label`, one line per value of `group` (None:
    one line); an optional horizontal baseline."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = list(dict.fromkeys(r[group] for r in rows)) if group else [None]
    for value in values:
        mine = [r for r in rows if group is None or r[group] == value]
        ax.plot(
            [r[x] for r in mine],
            [r[y] for r in mine],
            marker="o",
            label=None if group is None else f"{group} {value:g}",
        )
    if group:
        ax.legend(fontsize=8)
    if label:
        for r in rows:
            ax.annotate(str(r[label]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="red", ls="--", lw=1, label="labels only (no teacher)")
        ax.legend(fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_sweep_series(rows: list[dict], *, x: str, y: str, group: str) -> plt.Figure:
    """`y` against `x` for the rows that have both, one series per sweep and value of `group`.

    A series is the rows of one sweep (the first part of their `key`: grid/, topk/, variant/) that
    share the value of `group`. It is a line in order of x when its x values are distinct, and
    unconnected markers otherwise (the top-k rows all sit at one alpha, say). Rows without `group`
    (`bytes_per_image` is on the top-k rows only) are no series: grey crosses labelled "no <group>".
    """
    fig, ax = plt.subplots(figsize=(7, 3.6))
    have = [r for r in rows if x in r and y in r]
    series: dict[tuple, list[dict]] = {}
    for r in have:
        if r.get(group) is not None:
            sweep, slash, _ = str(r.get("key", "")).partition("/")
            series.setdefault((r[group], sweep if slash else ""), []).append(r)
    for (value, sweep), mine in sorted(series.items()):
        mine.sort(key=lambda r: r[x])
        xs = [r[x] for r in mine]
        connected = len(set(xs)) == len(xs) > 1  # a repeated x would draw a vertical zig-zag
        label = f"{group} = {value}" + (f" ({sweep})" if sweep else "")
        ax.plot(xs, [r[y] for r in mine], marker="o", ls="-" if connected else "none", label=label)
    lacking = [r for r in have if r.get(group) is None]
    if lacking:
        ax.plot([r[x] for r in lacking], [r[y] for r in lacking], "x", color="0.4", label=f"no {group}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if have:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: hides no point
    fig.tight_layout()
    return fig


def plot_distributions(
    series: dict[str, torch.Tensor], classes: list[str], *, image: torch.Tensor | None = None, title: str = ""
) -> plt.Figure:
    """Grouped bars: several distributions over the same classes (teacher, rebuilt top-k, student).

    `image` (C, H, W), when given, gets its own panel left of the bars. The legend sits above the
    bars, outside every panel, so neither the image nor a tall bar covers it.
    """
    if image is None:
        fig, ax = plt.subplots(figsize=(8, 3.8))
    else:
        fig, (ax_image, ax) = plt.subplots(1, 2, figsize=(9.5, 3.8), gridspec_kw=dict(width_ratios=[1, 4]))
        _show_image(ax_image, image)
    width = 0.8 / max(len(series), 1)
    for i, (name, probs) in enumerate(series.items()):
        ax.bar(
            [c + (i - (len(series) - 1) / 2) * width for c in range(len(classes))],
            probs.detach().float().cpu().numpy(),
            width,
            label=name,
        )
    ax.set_xticks(range(len(classes)), [c[:10] for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=max(len(series), 1), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _show_image(ax: plt.Axes, image: torch.Tensor) -> None:
    """Draw a (C, H, W) image on `ax`, its values rescaled to [0, 1] (grey when C is 1), without axes."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min() + 1e-8)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.axis("off")


def plot_conditions(summary: dict[str, dict], *, title: str = "", ylabel: str = "test top-1 (%)") -> plt.Figure:
    """One bar per condition (`experiment.condition_summary`'s mean), ±1 standard error as error
    bars, and each seed's value as a dot."""
    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1.5, 3.6))
    means = [summary[n]["mean"] for n in names]
    errors = [summary[n]["se"] or 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.6)
    for i, n in enumerate(names):
        values = list(summary[n]["per_seed"].values())
        ax.plot([i] * len(values), values, "o", color="black", ms=3)
    low = min(min(summary[n]["per_seed"].values()) for n in names)
    high = max(max(summary[n]["per_seed"].values()) for n in names)
    ax.set_ylim(low - 0.3 * max(high - low, 1.0), high + 0.3 * max(high - low, 1.0))
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "mean over seeds, ±1 SE; dots: seeds", fontsize=10)
    fig.tight_layout()
    return fig


def plot_paired(rows: list[dict], pairs: list[tuple[str, str]], gains: list[dict], metric: str = "test_top1"):
    """One panel per (condition, reference) pair: each seed's two numbers joined by a line (what
    pairing by seed compares), and beside them the per-seed differences with their mean and 95%
    t-interval (`gains`: the pairs' `paired_gain`s, in order)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
    for ax, (condition, reference), gain in zip(axes[0], pairs, gains, strict=True):
        values = {(r["condition"], r["seed"]): r[metric] for r in rows}
        for seed in gain["per_seed"]:
            ax.plot([0, 1], [values[reference, seed], values[condition, seed]], marker="o", color="tab:gray")
            ax.annotate(
                f"seed {seed}", (1, values[condition, seed]), xytext=(4, 0), textcoords="offset points", fontsize=7
            )
        ax.set_xticks([0, 1], [reference, condition], fontsize=8)
        ax.set_xlim(-0.3, 1.6)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        twin = ax.twinx()  # the differences, on their own scale
        diffs = list(gain["per_seed"].values())
        twin.scatter([1.4] * len(diffs), diffs, color="tab:blue", s=14)
        if gain["interval"] is not None:
            lo, hi = gain["interval"]
            twin.errorbar(
                [1.4], [gain["mean"]], yerr=[[gain["mean"] - lo], [hi - gain["mean"]]], color="tab:blue", capsize=4
            )
        twin.axhline(0, color="tab:blue", lw=0.6, ls=":")
        twin.set_ylabel("per-seed difference, mean and 95% t-interval", color="tab:blue", fontsize=8)
        ax.set_title(f"{condition} − {reference}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_patience(
    table: dict[tuple[str, int], dict],
    conditions: list[str],
    lengths: list[int],
    *,
    gaps: dict[str, dict[int, dict]] | None = None,
    curves: dict[str, list[tuple[int, float]]] | None = None,
    steps_per_epoch: int | None = None,
    curve_images: str = "validation",
    title: str = "",
) -> plt.Figure:
    """Accuracy against schedule length (log x), one line per condition: `table[condition, epochs]`
    is a `condition_summary` entry, drawn with its 95% t-interval. With `gaps` (a label -> epochs ->
    `paired_gain`), a second panel draws each paired gap with its 95% t-interval; with `curves` (a
    condition -> (epoch, mean validation top-1) of the longest schedule), a third draws them, to show
    whether a condition overfits late, on the images `curve_images` names (e.g. "50 validation
    images per class"). `steps_per_epoch` adds optimiser steps to the x labels."""
    panels = 1 + (gaps is not None) + (curves is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ticks = [f"{e}\n({e * steps_per_epoch:,} steps)" if steps_per_epoch else str(e) for e in lengths]

    def lengths_axis(ax: plt.Axes) -> None:
        ax.set_xscale("log")
        ax.set_xticks(lengths, ticks, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("epochs on the labelled set (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    ax = axes[0, 0]
    for i, condition in enumerate(conditions):
        shift = 1 + 0.02 * (i - (len(conditions) - 1) / 2)  # keep the error bars of a length apart
        means = [table[condition, e]["mean"] for e in lengths]
        errors = [table[condition, e].get("half_width") or 0.0 for e in lengths]
        ax.errorbar([e * shift for e in lengths], means, yerr=errors, marker="o", capsize=3, label=condition)
    ax.set_ylabel("test top-1 (%), 95% t-interval")
    ax.set_title(title or "patience and consistency", fontsize=10)
    lengths_axis(ax)
    if gaps is not None:
        ax = axes[0, 1]
        for i, (label, by_length) in enumerate(gaps.items()):
            shift = 1 + 0.03 * (i - (len(gaps) - 1) / 2)
            means = [by_length[e]["mean"] for e in lengths]
            errors = [
                [m - (by_length[e]["interval"] or (m, m))[0] for m, e in zip(means, lengths, strict=True)],
                [(by_length[e]["interval"] or (m, m))[1] - m for m, e in zip(means, lengths, strict=True)],
            ]
            ax.errorbar([e * shift for e in lengths], means, yerr=errors, marker="o", capsize=3, label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("paired gap, test top-1 points (95% t-interval)")
        ax.set_title("gaps, paired by seed", fontsize=10)
        lengths_axis(ax)
    if curves is not None:
        _draw_longest_schedule(axes[0, panels - 1], curves, lengths[-1], curve_images)
    fig.tight_layout()
    return fig


def _draw_longest_schedule(ax: plt.Axes, curves: dict[str, list[tuple[int, float]]], epochs: int, images: str) -> None:
    """`plot_patience`'s third panel: each condition's (epoch, mean top-1 on `images`) during the
    longest schedule (`epochs`)."""
    for condition, points in curves.items():
        ax.plot([e for e, _ in points], [v for _, v in points], marker=".", label=condition)
    ax.set_xlabel("epoch of the longest schedule")
    ax.set_ylabel(f"top-1 (%) on {images},\nmean over seeds", fontsize=9)
    ax.set_title(f"during the longest schedule ({epochs} epochs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
