"""The ipywidgets explorers run headless (Agg backend) with every choice of their controls."""

from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tinyvit_lib.explore import distribution_explorer, sweep_explorer  # noqa: E402
from tinyvit_lib.logit_store import StoreHeader, StoreWriter, encode_records  # noqa: E402

ROWS = [  # as notebook 04 writes them: the top-k rows alone have bytes_per_image, the variants params_m
    dict(key="grid/T=1/alpha=0.5", temperature=1.0, alpha=0.5, k=10, top1=75.0, seconds=40.0),
    dict(key="grid/T=1/alpha=1", temperature=1.0, alpha=1.0, k=10, top1=75.8, seconds=40.2),
    dict(key="grid/T=2/alpha=0.5", temperature=2.0, alpha=0.5, k=10, top1=76.0, seconds=41.0),
    dict(key="grid/T=2/alpha=1", temperature=2.0, alpha=1.0, k=10, top1=76.4, seconds=41.3),
    dict(key="topk/k=1", temperature=2.0, alpha=0.5, k=1, bytes_per_image=16, top1=75.5, seconds=40.5),
    dict(key="topk/k=5", temperature=2.0, alpha=0.5, k=5, bytes_per_image=48, top1=75.9, seconds=40.7),
    dict(
        key="variant/tinyvit_11m",
        model="tinyvit_11m",
        temperature=2.0,
        alpha=0.5,
        k=10,
        params_m=11.0,
        top1=74.0,
        seconds=52.0,
    ),
]


def drawn(x: str, metric: str, group: str) -> list[matplotlib.lines.Line2D]:
    """The lines (and marker sets) `sweep_explorer(ROWS)` draws for one choice of its controls."""
    plt.close("all")
    sweep_explorer(ROWS)(x=x, metric=metric, group=group)
    lines = plt.gcf().axes[0].lines
    plt.close("all")
    return lines


@pytest.mark.parametrize(
    "x, metric, group",
    [
        ("alpha", "top1", "temperature"),
        ("bytes_per_image", "top1", "k"),
        ("params_m", "seconds", "alpha"),
        ("seconds", "top1", "bytes_per_image"),
    ],
)
def test_sweep_explorer_draws_every_axis_choice(x, metric, group):
    options = sweep_explorer(ROWS).widget.children[0].options  # the x dropdown: numbers of every row
    assert {"alpha", "bytes_per_image", "params_m", "top1"} <= set(options)
    have = [r for r in ROWS if x in r and metric in r]
    assert sum(len(line.get_xdata()) for line in drawn(x, metric, group)) == len(have)  # every row, once


def test_rows_without_the_grouping_field_are_loose_markers_not_a_series():
    lines = {line.get_label(): line for line in drawn("seconds", "top1", "bytes_per_image")}
    assert not any("None" in label for label in lines)
    lacking = lines["no bytes_per_image"]  # the grid rows and the variant
    assert len(lacking.get_xdata()) == 5
    assert lacking.get_linestyle() == "None"


def test_only_points_of_one_series_are_connected():
    """Grouped by temperature, T = 2 holds grid rows along alpha and top-k rows all at alpha 0.5:
    a line through both would zig-zag up and down at 0.5."""
    lines = [line for line in drawn("alpha", "top1", "temperature") if line.get_linestyle() != "None"]
    for line in lines:
        xs = list(line.get_xdata())
        assert xs == sorted(set(xs)), (line.get_label(), xs)  # one point per x, in order
    assert sorted(len(line.get_xdata()) for line in lines) == [2, 2]  # the grid at T = 1 and at T = 2


def test_sweep_explorer_starts_on_validation_top1_when_the_rows_have_it():
    assert sweep_explorer(ROWS).widget.children[1].value == "top1"
    rows = [
        {k: v for k, v in r.items() if k != "top1"} | dict(val_top1=r["top1"] - 1, test_top1=r["top1"]) for r in ROWS
    ]
    show = sweep_explorer(rows)
    assert show.widget.children[1].value == "val_top1"
    assert {"val_top1", "test_top1", "seconds"} <= set(show.widget.children[1].options)


def test_sweep_explorer_refuses_rows_without_measurements_and_offers_only_measurements_as_metric():
    with pytest.raises(ValueError, match="has a measured field"):
        sweep_explorer([dict(key="grid/a", model="tinyvit_5m", alpha=0.5)])  # a setting, not a result
    metrics = set(sweep_explorer(ROWS).widget.children[1].options)
    assert metrics == {"top1", "seconds", "bytes_per_image"}  # not alpha, k, temperature or params_m


@pytest.fixture
def shown_distributions(tmp_path) -> Iterator[plt.Figure]:
    """The distribution explorer's figure for the last of 4 samples, teacher and student given."""
    logits = torch.randn(4, 10)
    header = StoreHeader(
        teacher=dict(name="t"),
        dataset=dict(name="d", size=4),
        img_size=8,
        transform="EvalTransform(img_size=8)",
        mode="static",
        k=3,
        num_classes=10,
        epochs=1,
        data_seed=0,
    )
    writer = StoreWriter(tmp_path / "store", header, batch_size=4)
    writer.append(0, encode_records(logits, [-1] * 4, 3))
    store = writer.finish()
    show = distribution_explorer(
        store,
        torch.rand(4, 1, 8, 8),
        [str(c) for c in range(10)],
        teacher_logits=logits,
        student_logits=torch.randn(4, 10),
    )
    plt.close("all")
    show(sample=3, temperature=4.0)
    fig = plt.gcf()
    yield fig
    plt.close(fig)


def test_distribution_explorer_shows_all_three_distributions(shown_distributions):
    (legend,) = [ax.get_legend() for ax in shown_distributions.axes if ax.get_legend()]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["teacher (all logits)", "from the store (top 3)", "student"]


def test_distribution_explorer_legend_covers_neither_the_image_nor_the_bars(shown_distributions):
    fig = shown_distributions
    fig.canvas.draw()
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    box = legend.get_window_extent()
    (image_axes,) = [ax for ax in fig.axes if ax.images]
    assert not box.overlaps(image_axes.get_window_extent())
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off
