"""Interactive exploration for the notebooks (ipywidgets). Every figure that matters is also drawn
by a plain cell; these only let a reader move the knobs. Headless runs (papermill, nbval) build
the widgets and render them once with their defaults."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from .logit_store import LogitStore
from .plots import plot_distributions

__all__ = ["distribution_explorer", "sweep_explorer"]


def distribution_explorer(
    store: LogitStore,
    images: torch.Tensor,
    classes: list[str],
    *,
    teacher_logits: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    epoch: int = 0,
):
    """A temperature slider and a sample picker: for one stored image, the teacher's full distribution
    (when given), the one rebuilt from its top-k record, and the student's, at that temperature.

    `images` (N, C, H, W) are the first N samples of the store, for display only; the logits are (N, C).
    """
    import ipywidgets as widgets

    def show(sample: int = 0, temperature: float = 1.0):
        series = {}
        if teacher_logits is not None:
            series["teacher (all logits)"] = F.softmax(teacher_logits[sample] / temperature, dim=-1)
        series[f"from the store (top {store.header.k})"] = F.softmax(store.logits(epoch, [sample])[0] / temperature, -1)
        if student_logits is not None:
            series["student"] = F.softmax(student_logits[sample] / temperature, dim=-1)
        fig = plot_distributions(series, classes, title=f"sample {sample}, T = {temperature:g}")
        inset = fig.add_axes([0.80, 0.55, 0.16, 0.35])
        image = images[sample].float()
        shown = (image - image.min()) / (image.max() - image.min() + 1e-8)  # (C, H, W) in [0, 1]
        inset.imshow(shown.permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray")
        inset.axis("off")
        plt.show()

    return widgets.interact(
        show,
        sample=widgets.IntSlider(0, 0, images.shape[0] - 1),
        temperature=widgets.FloatLogSlider(value=1.0, base=2, min=-2, max=3, step=0.25),
    )


def sweep_explorer(rows: list[dict]):
    """Pick the x axis, the metric and a filter column of the sweep results and see them plotted."""
    import ipywidgets as widgets

    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def show(x: str = "alpha", metric: str = "top1", group: str = "temperature"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        have = [r for r in rows if x in r and metric in r]  # e.g. bytes_per_image: the top-k rows only
        for value in sorted({r.get(group) for r in have}, key=str):
            mine = sorted((r for r in have if r.get(group) == value), key=lambda r: r[x])
            ax.plot([r[x] for r in mine], [r[metric] for r in mine], marker="o", label=f"{group} = {value}")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        plt.show()

    x_axis = widgets.Dropdown(options=numeric, value="alpha" if "alpha" in numeric else numeric[0])
    return widgets.interact(
        show,
        x=x_axis,
        metric=widgets.Dropdown(options=numeric, value="top1" if "top1" in numeric else numeric[0]),
        group=widgets.Dropdown(options=numeric, value="temperature" if "temperature" in numeric else numeric[0]),
    )
