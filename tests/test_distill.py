"""The distillation loss against hand computations, and its edge cases."""

import math
import re

import pytest
import torch

from tinyvit_lib.data import DataSpec, get_dataset
from tinyvit_lib.distill import (
    DistillationLoss,
    precompute,
    soft_cross_entropy,
    store_spec_differences,
    topk_fidelity,
)
from tinyvit_lib.logit_store import StoreHeader, encode_records, rebuild_logits
from tinyvit_lib.teachers import build_model


def test_matches_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    label = torch.tensor([0])
    alpha, T = 0.3, 2.0

    # By hand: softmax at T=2, KL(teacher || student), the CE of the label, then the blend.
    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax([1.0, 1.0, 0.0]), softmax([2.0, 0.0, -1.0])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = DistillationLoss(alpha, T)(student, label, teacher_logits=teacher)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss = DistillationLoss(alpha=0.0, temperature=3.0, label_smoothing=0.1)(logits, labels)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))


def test_alpha_one_t_one_is_soft_target_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    p = teacher.softmax(-1)
    loss = DistillationLoss(alpha=1.0, temperature=1.0)(
        student, torch.zeros(8, dtype=torch.long), teacher_logits=teacher
    )
    soft_ce = soft_cross_entropy(student, p)
    entropy = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(loss, soft_ce - entropy, atol=1e-6)


def test_the_loss_softens_both_sides_with_its_own_temperature():
    # The teacher gives logits; only the loss applies T, to the teacher's side as to the student's.
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    loss = DistillationLoss(1.0, 4.0)(student, torch.zeros(4, dtype=torch.long), teacher)
    p = (teacher / 4.0).softmax(-1)
    by_hand = (p * (p.log() - (student / 4.0).log_softmax(-1))).sum(-1).mean() * 16
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert not torch.allclose(loss, DistillationLoss(1.0, 1.0)(student, torch.zeros(4, dtype=torch.long), teacher))


def test_defaults_are_one_place():
    from tinyvit_lib.compat import FastDistillation
    from tinyvit_lib.distill import ALPHA, TEMPERATURE
    from tinyvit_lib.train import build_parser, spec_from_args
    from tinyvit_lib.trainer import TrainConfig

    cli = spec_from_args(build_parser().parse_args(["--name", "x"])).train  # the CLI leaves them to the library
    loss, fd, config = DistillationLoss(), FastDistillation().loss, TrainConfig()
    assert (ALPHA, TEMPERATURE) == (0.5, 1.0)
    for alpha, temperature in ((loss.alpha, loss.temperature), (fd.alpha, fd.temperature)):
        assert (alpha, temperature) == (ALPHA, TEMPERATURE)
    assert (config.alpha, config.temperature, cli.alpha, cli.temperature) == (ALPHA, TEMPERATURE) * 2


def test_zero_when_student_equals_teacher_and_alpha_one():
    z = torch.randn(3, 7)
    assert DistillationLoss(1.0, 2.0)(z, torch.zeros(3, dtype=torch.long), teacher_logits=z).abs() < 1e-6


def test_a_teacher_with_vanishing_classes_gives_a_finite_loss():
    teacher = torch.tensor([[9.0, 7.0, -200.0, -200.0]])  # softmax underflows to exact zeros
    assert (teacher.softmax(-1) == 0).any()
    loss = DistillationLoss(1.0, 1.0)(torch.randn(1, 4), torch.tensor([0]), teacher)
    assert torch.isfinite(loss)


def test_soft_labels_for_mixup():
    logits = torch.randn(2, 3)
    onehot = torch.eye(3)[[0, 2]]
    assert torch.allclose(
        soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    )
    smoothed = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, onehot, 0.1), smoothed)  # smoothing as for labels
    assert not torch.allclose(soft_cross_entropy(logits, onehot), smoothed)
    # a column of labels, or one row of probabilities, would broadcast into a wrong loss: refused
    for target in (torch.tensor([[0], [2]]), onehot[:1]):
        message = f"targets of shape {tuple(target.shape)} for logits of shape (2, 3)"
        with pytest.raises(ValueError, match=re.escape(message)):
            soft_cross_entropy(logits, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-0.1), "alpha must be in \\[0, 1\\], got -0.1"),
        (dict(alpha=1.5), "got 1.5"),
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=-2.0), "got -2.0"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)


def test_missing_or_mismatched_teacher():
    loss = DistillationLoss(0.5, 1.0)
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]), teacher_logits=torch.randn(2, 4))


def _header(mode: str, **data) -> StoreHeader:
    spec = DataSpec(dataset="synthetic", **data)
    return StoreHeader(
        teacher={}, dataset={"size": 10}, img_size=32, transform="", mode=mode, k=3, num_classes=10, epochs=1,
        data_seed=spec.data_seed, data=spec.for_store(),
    )  # fmt: skip


def test_a_store_names_every_field_in_which_a_student_differs():
    student = DataSpec(dataset="synthetic", val_per_class=4, max_per_class=3)
    assert store_spec_differences(_header("replay", val_per_class=4, max_per_class=3), student) == []
    assert store_spec_differences(_header("replay", val_per_class=4), student) == []  # the pool serves any cut
    assert store_spec_differences(_header("replay", val_per_class=4, data_seed=2), student) == [
        "data_seed: store 2, run 0"
    ]
    # A static store holds evaluation views: the student's augmentation and data seed do not matter.
    assert store_spec_differences(_header("static", augment="none", val_per_class=4, data_seed=2), student) == []
    assert store_spec_differences(_header("static", augment="none", max_per_class=3), student) == [
        "val_per_class: store None, run 4"
    ]
    # Mixed views under a carve pair within the set the store covers: a cut of it pairs otherwise.
    mixed = DataSpec(dataset="synthetic", val_per_class=4, max_per_class=3, mix="full")
    assert store_spec_differences(_header("replay", val_per_class=4, mix="full"), mixed) == [
        "max_per_class: store None, run 3"
    ]


def test_a_store_records_only_a_spec_that_describes_its_data(tmp_path):
    dataset = get_dataset("synthetic", split="train", num_samples=40)
    teacher = build_model("resnet18", num_classes=10, img_size=32)
    wrong = DataSpec(dataset="synthetic", img_size=48, augment="light", mix="full")
    with pytest.raises(ValueError, match=r"img_size: spec 48, data 32; augmented: spec True, data False; mix: spec"):
        precompute(teacher, dataset, tmp_path / "s", k=3, spec=wrong, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_data_spec_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="dataset='imagenet-subset' needs num_classes and files_per_class"):
        DataSpec(dataset="imagenet-subset")


def test_topk_fidelity_is_exact_where_the_record_is_and_says_how_far_it_is_elsewhere():
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    rows = {(r["k"], r["temperature"]): r for r in topk_fidelity(logits, [1, 3, 9, 10], [1.0, 4.0])}
    for k in (9, 10):  # a tail of one class or none: only the fp16 rounding of the kept logits is lost
        assert rows[k, 1.0]["tv"] < 2e-3 and rows[k, 4.0]["tv"] < 2e-3
    assert rows[3, 1.0]["tv"] > 0.01 and rows[1, 1.0]["kl"] > rows[3, 1.0]["kl"] > rows[9, 1.0]["kl"]
    assert rows[10, 1.0]["tail_mass"] < 1e-12 and 0 < rows[3, 1.0]["tail_mass"] < rows[1, 1.0]["tail_mass"] < 1
    # at T = 1 the tail's mass is exact; at T = 4 the rebuilt tail is too heavy (power-mean inequality)
    rebuilt = rebuild_logits(encode_records(logits, [0] * 64, 3), 10)
    top = logits.topk(3, dim=1).indices
    outside = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    for temperature, heavier in ((1.0, False), (4.0, True)):
        true_tail = (logits / temperature).softmax(-1)[outside].view(64, 7).sum(-1)
        rebuilt_tail = (rebuilt / temperature).softmax(-1)[outside].view(64, 7).sum(-1)
        if heavier:
            assert (rebuilt_tail >= true_tail - 1e-6).all() and (rebuilt_tail - true_tail).mean() > 0.01
        else:
            assert torch.allclose(rebuilt_tail, true_tail, atol=2e-3)
    with pytest.raises(ValueError, match=r"\[11, 0.0\] out of range"):
        topk_fidelity(logits, [11], [0.0])
