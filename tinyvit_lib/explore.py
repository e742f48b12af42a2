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


# What a sweep row measured (a metric can be any of these); every other numeric field is a setting
# (alpha, temperature, k, epochs, seed, ...), which can be an axis or a grouping but is not a result.
MEASURED = (
    "val_top1",
    "val_top5",
    "test_top1",
    "test_top5",
    "top1",
    "top5",
    "seconds",
    "total_seconds",
    "bytes_per_image",
)


def sweep_explorer(rows: list[dict]):
    """Pick the x axis, the metric and the grouping field of the sweep results and see them plotted
    (`plot_sweep_series`: one line per series, rows without the grouping field as loose markers).

    The x axis and the grouping can be any numeric field of any row; the metric only a measured
    quantity (`MEASURED`), starting on validation top-1 (`val_top1`) where the rows have it.

    Raises:
        ValueError: no row has a numeric field, or none has a measured one.
    """
    import ipywidgets as widgets

    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    measured = [k for k in MEASURED if k in numeric]
    if not measured:
        raise ValueError(
            f"sweep_explorer: none of the {len(rows)} row(s) has a measured field ({', '.join(MEASURED)}) to plot"
        )

    def show(x: str, metric: str, group: str) -> None:
        plot_sweep_series(rows, x=x, y=metric, group=group)
        plt.show()

    def dropdown(options: list[str], *preferred: str) -> widgets.Dropdown:
        """`options`, set on the first of `preferred` that is one of them (else the first option)."""
        return widgets.Dropdown(options=options, value=next((p for p in preferred if p in options), options[0]))

    return widgets.interact(
        show,
        x=dropdown(numeric, "alpha"),
        metric=dropdown(measured, "val_top1", "top1"),
        group=dropdown(numeric, "temperature"),
    )
