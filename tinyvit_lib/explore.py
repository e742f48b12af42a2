"""Interactive exploration for the notebooks (ipywidgets). Every figure that matters is also drawn
by a plain cell; these only let a reader move the knobs. Headless runs (papermill, nbval) build
the widgets and render them once with their defaults."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from .logit_store import LogitStore
from .plots import plot_distributions, plot_sweep_series

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

    def show(sample: int, temperature: float) -> None:
        series = {}
        if teacher_logits is not None:
            series["teacher (all logits)"] = F.softmax(teacher_logits[sample] / temperature, dim=-1)
        series[f"from the store (top {store.header.k})"] = F.softmax(store.logits(epoch, [sample])[0] / temperature, -1)
        if student_logits is not None:
            series["student"] = F.softmax(student_logits[sample] / temperature, dim=-1)
        plot_distributions(series, classes, image=images[sample], title=f"sample {sample}, T = {temperature:g}")
        plt.show()

    return widgets.interact(
        show,
        sample=widgets.IntSlider(0, 0, images.shape[0] - 1),
        temperature=widgets.FloatLogSlider(value=1.0, base=2, min=-2, max=3, step=0.25),
    )


def sweep_explorer(rows: list[dict]):
    """Pick the x axis, the metric and the grouping field of the sweep results and see them plotted
    (`plot_sweep_series`: one line per series, rows without the grouping field as loose markers).

    Every numeric field of any row can be chosen; the metric starts on validation top-1 (`val_top1`)
    where the rows have it, else on `top1`.

    Raises:
        ValueError: no row has a numeric field.
    """
    import ipywidgets as widgets

    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not numeric:
        raise ValueError(f"sweep_explorer: none of the {len(rows)} row(s) has a numeric field to plot")

    def show(x: str, metric: str, group: str) -> None:
        plot_sweep_series(rows, x=x, y=metric, group=group)
        plt.show()

    def dropdown(*preferred: str) -> widgets.Dropdown:
        """The numeric fields, set on the first of `preferred` that some row has (else the first field)."""
        return widgets.Dropdown(options=numeric, value=next((p for p in preferred if p in numeric), numeric[0]))

    return widgets.interact(
        show, x=dropdown("alpha"), metric=dropdown("val_top1", "top1"), group=dropdown("temperature")
    )
