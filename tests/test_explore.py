"""The ipywidgets explorers run headless (Agg backend) with every choice of their controls."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tinyvit_lib.explore import distribution_explorer, sweep_explorer  # noqa: E402
from tinyvit_lib.logit_store import StoreHeader, StoreWriter, encode_records  # noqa: E402

ROWS = [  # as notebook 04 writes them: the top-k rows alone have bytes_per_image, the variants params_m
    dict(key="grid/T=1/alpha=0.5", temperature=1.0, alpha=0.5, k=10, top1=75.0, seconds=40.0),
    dict(key="grid/T=2/alpha=0.5", temperature=2.0, alpha=0.5, k=10, top1=76.0, seconds=41.0),
    dict(key="topk/k=1", temperature=2.0, alpha=0.5, k=1, bytes_per_image=16, top1=75.5, seconds=40.5),
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
    show = sweep_explorer(ROWS)
    options = show.widget.children[0].options  # the x dropdown lists numbers of every row, not only the first
    assert {"alpha", "bytes_per_image", "params_m", "top1"} <= set(options)
    plt.close("all")
    show(x=x, metric=metric, group=group)
    lines = plt.gcf().axes[0].lines
    have = [r for r in ROWS if x in r and metric in r]
    assert len(lines) == len({r.get(group) for r in have})  # one line per group value
    assert sum(len(line.get_xdata()) for line in lines) == len(have)  # every row that has both axes, once
    plt.close("all")


def test_distribution_explorer_shows_all_three_distributions(tmp_path):
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
        base_seed=0,
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
    labels = [t.get_text() for t in plt.gcf().axes[0].get_legend().get_texts()]
    assert labels == ["teacher (all logits)", "from the store (top 3)", "student"]
    plt.close("all")
