"""The TinyViT family: exact sizes, shapes, gradients, weight interop and bad input."""

import copy

import pytest
import torch

from tinyvit_lib import (
    TinyViT,
    TinyViTConfig,
    count_flops,
    fuse_for_inference,
    inference_copy,
    load_pretrained,
    tinyvit_5m,
    tinyvit_11m,
    tinyvit_21m,
)
from tinyvit_lib.model import (
    SmallMapConv2d,
    _one_pixel_window,
    default_window_sizes,
    official_to_ours,
    ours_to_official,
    pointwise_conv,
    read_weights,
    small_map_conv,
    small_map_depthwise,
    stage_resolutions,
    winograd_conv3x3,
    with_small_map_convs,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN statistics, BN affines and attention biases non-trivial values (they start as 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("running" in name or "bn." in name or "attention_biases" in name):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize(
    "factory, kwargs, expected",
    [
        (tinyvit_5m, {}, 5_392_764),
        (tinyvit_11m, {}, 10_996_972),
        (tinyvit_21m, {}, 21_198_568),
        (tinyvit_21m, {"img_size": 384}, 21_230_488),
        (tinyvit_21m, {"img_size": 512}, 21_268_120),
    ],
)
def test_exact_parameter_counts(factory, kwargs, expected):
    assert n_params(factory(**kwargs)) == expected


def test_official_window_sizes():
    assert default_window_sizes(224) == (7, 7, 14, 7)
    assert default_window_sizes(384) == (12, 12, 24, 12)
    assert default_window_sizes(512) == (16, 16, 32, 16)
    assert tinyvit_21m(img_size=384).config.window_sizes == (12, 12, 24, 12)
    assert stage_resolutions(224) == [56, 28, 14, 7]
    assert stage_resolutions(28) == [7, 4, 2, 1]


@pytest.mark.parametrize("img_size, in_chans", [(224, 3), (32, 3), (28, 1), (32, 1)])
def test_output_shape_and_finite(img_size, in_chans):
    model = tinyvit_5m(img_size=img_size, in_chans=in_chans, num_classes=10).eval()
    x = torch.randn(2, in_chans, img_size, img_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    assert model.forward_features(x).shape == (2, 320) + (stage_resolutions(img_size)[-1],) * 2


def test_every_parameter_receives_a_gradient():
    model = tinyvit_5m(img_size=224, num_classes=10)
    perturb_(model)  # zero-initialised BN gammas would block gradients to the convs before them
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_reset_classifier():
    model = tinyvit_5m(num_classes=1000, img_size=32).eval()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.config.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 320)


def test_small_windows_attend_the_whole_map_without_padding():
    """At 32x32 the 4x4/2x2/1x1 maps fit in one window: cost is far below timm's padded windows."""
    model = tinyvit_5m(img_size=32)
    block = model.stages[2].blocks[0]
    assert block.window_grid(2, 2) == (2, 2)
    assert block.attn.bias_index.shape == (4, 4)
    assert count_flops(model) < 60e6  # ~48 MFLOP; 14x14 padded windows would cost > 500 MFLOP


def test_windows_partition_larger_maps():
    """A 28x28 map with window 7 is cut into 16 windows: tokens never see outside their window."""
    torch.manual_seed(0)
    block = perturb_(tinyvit_5m().stages[1].blocks[0]).eval()  # dim 128, window 7
    x = torch.randn(1, 28, 28, 128)
    elsewhere = x.clone()
    elsewhere[:, 7:] = torch.randn_like(elsewhere[:, 7:])
    elsewhere[:, :, 7:] = torch.randn_like(elsewhere[:, :, 7:])
    with torch.no_grad():
        y, y_elsewhere = block(x), block(elsewhere)
    # Inside the top-left window, away from the depthwise conv's one-pixel reach, nothing changed.
    assert torch.allclose(y[:, :6, :6], y_elsewhere[:, :6, :6], atol=1e-5)
    assert not torch.allclose(y[:, 6:7, :6], y_elsewhere[:, 6:7, :6], atol=1e-3)


def test_input_size_other_than_configured_is_handled():
    """A model built for 224 runs at 160 (windows re-indexed on the fly) and equals one built for 160."""
    a = perturb_(tinyvit_5m(img_size=224)).eval()
    b = tinyvit_5m(img_size=160).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("variant", ["5m", "11m", "21m"])
def test_timm_parity(variant):
    timm = pytest.importorskip("timm")
    theirs = perturb_(timm.create_model(f"tiny_vit_{variant}_224", num_classes=1000)).eval()
    ours = load_pretrained(
        {"5m": tinyvit_5m, "11m": tinyvit_11m, "21m": tinyvit_21m}[variant](), theirs.state_dict()
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4
        if variant == "5m":  # at 288 the maps of 36, 18 and 9 pixels pad to whole windows, as timm's do
            x = torch.randn(1, 3, 288, 288)
            assert (ours(x) - theirs(x)).abs().max() <= 1e-4


def test_official_naming_round_trip(tmp_path):
    src = perturb_(tinyvit_5m(img_size=32, num_classes=10)).eval()
    official = ours_to_official(src.state_dict())
    assert "layers.0.downsample.conv1.c.weight" in official  # stage-1 merging lives in layer 0
    assert "patch_embed.seq.0.c.weight" in official and "norm_head.weight" in official
    assert "head.weight" in official and not any(k.startswith("stages.") for k in official)
    assert set(official_to_ours(official)) == set(src.state_dict())
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    dst = load_pretrained(tinyvit_5m(img_size=32, num_classes=10), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_safetensors_and_skip_head(tmp_path):
    from safetensors.torch import save_file

    src = perturb_(tinyvit_5m(img_size=32, num_classes=1000))
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = tinyvit_5m(img_size=32, num_classes=10)
    with pytest.raises(ValueError, match="head.fc.weight.*skip_head"):
        load_pretrained(dst, path)
    load_pretrained(dst, path, skip_head=True)
    assert torch.equal(dst.stages[1].blocks[0].attn.qkv.weight, src.stages[1].blocks[0].attn.qkv.weight)


def test_loading_at_another_resolution_resizes_biases():
    src = perturb_(tinyvit_21m(img_size=224))
    dst = load_pretrained(tinyvit_21m(img_size=384), src.state_dict())
    table = dst.stages[2].blocks[0].attn.attention_biases
    assert table.shape == (12, 24 * 24)
    # A smooth resize keeps the range of the 14x14 table.
    old = src.stages[2].blocks[0].attn.attention_biases
    assert old.min() - 0.2 <= table.min() and table.max() <= old.max() + 0.2
    # The grid keeps its orientation: a table that grows with the row offset dy and is flat along dx
    # still does after resizing (a transposed or flipped grid would not).
    dy = torch.arange(14.0).repeat_interleave(14)  # offset index = dy * 14 + dx
    src.stages[2].blocks[0].attn.attention_biases.data.copy_(dy.expand(12, -1))
    grid = load_pretrained(tinyvit_21m(img_size=384), src.state_dict()).stages[2].blocks[0].attn.attention_biases
    grid = grid.detach().view(12, 24, 24)
    assert torch.allclose(grid, grid[:, :, :1], atol=1e-5) and (grid[:, 1:, 0] - grid[:, :-1, 0]).min() > 0
    # A constant table stays constant under bicubic resizing.
    src.stages[3].blocks[0].attn.attention_biases.data.fill_(0.7)
    dst = load_pretrained(tinyvit_21m(img_size=384), src.state_dict())
    assert torch.allclose(dst.stages[3].blocks[0].attn.attention_biases, torch.tensor(0.7))


def test_no_stale_cache_after_load_eval_or_to():
    model = tinyvit_5m(img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        other = perturb_(copy.deepcopy(model), seed=1)
        model.load_state_dict(other.state_dict())
        after = model(x)
        assert not torch.allclose(before, after)
        assert torch.equal(after, other(x))
        model.train().eval()
        model.to(torch.float64).to(torch.float32)
        assert torch.equal(model(x), after)


def test_fuse_for_inference_matches():
    model = perturb_(tinyvit_5m(img_size=32, num_classes=10)).eval()
    fused = fuse_for_inference(model)
    assert not any(type(m).__name__ == "ConvBN" for m in fused.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), fused(x), atol=1e-4)


@pytest.mark.parametrize(
    "stride, side, groups, in_float32",
    [(2, 8, 16, True), (1, 4, 16, True), (1, 2, 16, True), (1, 8, 16, False), (2, 8, 1, False)],
)
def test_cpu_autocast_keeps_strided_and_small_depthwise_convolutions_in_float32(stride, side, groups, in_float32):
    # oneDNN's bf16 backward of these is 4-40x slower than fp32; every other convolution stays in bf16.
    from tinyvit_lib.model import ConvBN

    torch.manual_seed(0)
    block = ConvBN(16, 16, 3, stride=stride, groups=groups)
    x = torch.randn(4, 16, side, side, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == (torch.float32 if in_float32 else torch.bfloat16)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and block.conv.weight.grad.dtype == torch.float32
    if in_float32:  # the same numbers as oneDNN's fp32 convolution without autocast
        block.small_map_products = False
        assert torch.equal(y, block(x))
    assert block(x).dtype == torch.float32  # no autocast, no change


def test_a_bf16_training_step_of_the_whole_model_keeps_float32_weights_and_finite_grads():
    model = tinyvit_5m(img_size=32, num_classes=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone():
    from tinyvit_lib.teachers import build_model

    resnet = build_model("resnet18", num_classes=10)  # its convolutions are SmallMapConv2d: fx must still fold them
    assert any(isinstance(m, SmallMapConv2d) for m in resnet.modules())
    for model in (perturb_(tinyvit_5m(img_size=32, num_classes=10)), perturb_(resnet)):
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        runner = inference_copy(model)
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, SmallMapConv2d)) for m in runner.modules())
        assert not runner.training and not any(p.requires_grad for p in runner.parameters())
        assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = model.eval()(x)
            assert torch.allclose(runner(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4)


def assert_same_convolution(plain: torch.nn.Conv2d, fast: torch.nn.Conv2d, x: torch.Tensor, *, rtol: float) -> None:
    """`fast(x)` is `plain(x)`, and so are the gradients of the input and of every parameter, up to
    `rtol` (a parameter's gradient sums over the batch and the map, so its tolerance scales with
    it). Leaves both modules' gradients at zero."""
    x = x.detach().clone().requires_grad_()
    x_fast = x.detach().clone().requires_grad_()
    out, out_fast = plain(x), fast(x_fast)
    assert out_fast.shape == out.shape
    torch.testing.assert_close(out_fast, out, atol=1e-5, rtol=rtol)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x.grad, atol=1e-5, rtol=rtol)
    for name, param in plain.named_parameters():
        scale = max(1.0, param.grad.abs().max().item())
        torch.testing.assert_close(getattr(fast, name).grad, param.grad, atol=1e-5 * scale, rtol=rtol)
    plain.zero_grad()
    fast.zero_grad()


@pytest.mark.parametrize(
    "conv, shape, path",
    [
        (dict(kernel_size=3, padding=1, bias=False), (1, 1), "one pixel"),  # ResNet-18's last stage at 32x32
        (dict(kernel_size=3, stride=2, padding=1, bias=False), (2, 2), "one pixel"),  # its 3x3 onto 1x1
        (dict(kernel_size=1, stride=2, bias=False), (2, 2), "one pixel"),  # its shortcut: one input pixel of four
        (dict(kernel_size=(3, 1), padding=(1, 0)), (1, 1), "one pixel"),  # asymmetric, with a bias
        (dict(kernel_size=1, stride=4, padding=1), (1, 1), "one pixel"),  # the one pixel sees only padding: the bias
        (dict(kernel_size=3, padding=1, bias=False), (2, 2), "product"),  # ResNet-18's third stage at 32x32
        (dict(kernel_size=3, padding=1), (1, 3), "product"),  # a 1x3 map, with a bias
        (dict(kernel_size=(3, 1), padding=(1, 0)), (2, 1), "product"),
        (dict(kernel_size=1), (2, 2), "product"),
        (dict(kernel_size=3, padding=1), (3, 3), "convolution"),  # 9 pixels: the convolution itself
        (dict(kernel_size=3, stride=2, padding=1), (4, 4), "convolution"),
        (dict(kernel_size=3, padding=1, groups=4), (1, 1), "convolution"),  # grouped: the convolution itself
        (dict(kernel_size=3, padding=1, bias=False), (8, 8), "winograd"),  # ResNet-18's first stage at 32x32
        (dict(kernel_size=3, padding=1, bias=False), (4, 4), "winograd"),  # its second
        (dict(kernel_size=3, padding=1), (4, 8), "winograd"),  # a 4x8 map, with a bias
        (dict(kernel_size=3, padding=1), (12, 12), "convolution"),  # 144 pixels: the transforms would cost more
        (dict(kernel_size=3, padding=1), (6, 6), "convolution"),  # sides not multiples of 4
        (dict(kernel_size=3, stride=2, padding=1), (8, 8), "convolution"),
        (dict(kernel_size=3), (8, 8), "convolution"),  # no padding
        (dict(kernel_size=5, padding=2), (8, 8), "convolution"),
        (dict(kernel_size=3, padding=1, groups=2), (8, 8), "convolution"),
        (dict(kernel_size=3, padding=1, dilation=2), (8, 8), "convolution"),
    ],
)
def test_small_map_convs_are_the_convolution_with_its_gradients(conv, shape, path, monkeypatch):
    from tinyvit_lib import model as model_module

    calls = {"product": [], "winograd": []}
    monkeypatch.setattr(model_module, "small_map_conv", lambda *a: calls["product"].append(1) or small_map_conv(*a))
    monkeypatch.setattr(
        model_module, "winograd_conv3x3", lambda *a: calls["winograd"].append(1) or winograd_conv3x3(*a)
    )
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 12, **conv)
    fast = with_small_map_convs(copy.deepcopy(plain))
    assert type(fast) is SmallMapConv2d and fast.state_dict().keys() == plain.state_dict().keys()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(5, 8, *shape).contiguous(memory_format=memory_format)
        assert (_one_pixel_window(fast, x) is not None) == (path == "one pixel")
        assert_same_convolution(plain, fast, x, rtol=1e-4 if path == "winograd" else 1e-5)  # F(4x4, 3x3) rounds worse
    assert {name: len(made) for name, made in calls.items()} == {name: 2 * (name == path) for name in calls}
    assert type(with_small_map_convs(fast, undo=True)) is torch.nn.Conv2d


@pytest.mark.parametrize(
    "side, path, switch", [(2, "small_map_conv", "small_map_products"), (8, "winograd_conv3x3", "winograd")]
)
def test_small_map_paths_keep_onednn_under_bf16_autocast_and_when_switched_off(side, path, switch, monkeypatch):
    from tinyvit_lib import model as model_module

    calls, function = [], getattr(model_module, path)
    monkeypatch.setattr(model_module, path, lambda *a: calls.append(1) or function(*a))
    conv = with_small_map_convs(torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(4, 8, side, side)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert not calls  # so the bf16 training of the committed results is unchanged
    setattr(conv, switch, False)
    conv(x)
    assert not calls
    setattr(conv, switch, True)
    conv(x)
    assert calls == [1]


def test_winograd_error_against_float64_stays_fp32_rounding():
    torch.manual_seed(0)
    x = torch.randn(16, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3) / 24  # outputs of about unit scale, as after a BatchNorm
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    for out in (winograd_conv3x3(x, w, None), torch.nn.functional.conv2d(x, w, padding=1)):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert (out.double() - exact).abs().max() < 1e-5 * exact.abs().max()


def test_a_whole_resnet18_step_with_winograd_matches_onednn(monkeypatch):
    from tinyvit_lib import model as model_module
    from tinyvit_lib.teachers import build_model

    calls = []
    monkeypatch.setattr(model_module, "winograd_conv3x3", lambda *a: calls.append(1) or winograd_conv3x3(*a))
    torch.manual_seed(0)
    fast = build_model("resnet18", num_classes=10, img_size=32).train()
    slow = copy.deepcopy(fast)
    for m in slow.modules():
        if isinstance(m, SmallMapConv2d):
            m.winograd = False
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    losses = [torch.nn.functional.cross_entropy(model(x), y) for model in (fast, slow)]
    for loss in losses:
        loss.backward()
    assert len(calls) == 7  # the first stage's four 3x3 convolutions (8x8), the second's three of stride 1 (4x4)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("side", [1, 2])
def test_small_map_conv_gives_a_channels_last_weight_its_gradient_in_that_layout(side):
    # so that the optimizer's gradient needs no copy into the weight's layout (a ResNet-18 step at
    # 32x32 spent 5 ms in that copy)
    conv = with_small_map_convs(torch.nn.Conv2d(16, 8, 3, padding=1, bias=False)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, side, side)
    (grad,) = torch.autograd.grad(conv(x).sum(), conv.weight)
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()


@pytest.mark.parametrize(
    "side, kernel, stride",
    [((1, 1), 3, 1), ((2, 2), 3, 1), ((2, 2), 3, 2), ((1, 2), 3, 1), ((2, 1), 3, 2), ((2, 2), 5, 1), ((3, 3), 3, 2)],
)
def test_small_map_depthwise_is_the_convolution_with_its_gradients(side, kernel, stride):
    torch.manual_seed(0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(5, 6, *side).contiguous(memory_format=memory_format).requires_grad_()
        weight = torch.randn(6, 1, kernel, kernel, requires_grad=True)
        ref = torch.nn.functional.conv2d(x, weight, None, stride, kernel // 2, 1, 6)
        out = small_map_depthwise(x, weight, stride, kernel // 2)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(ref)
        expected, got = torch.autograd.grad(ref, (x, weight), grad), torch.autograd.grad(out, (x, weight), grad)
        if side == (1, 1):  # only the centre tap meets the pixel: the same output and input gradient
            assert torch.equal(out, ref) and torch.equal(got[0], expected[0])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", [(1, 1), (2, 2), (4, 4), (3, 5)])
def test_pointwise_conv_is_the_convolution_with_its_gradients(side):
    torch.manual_seed(0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(5, 6, *side).contiguous(memory_format=memory_format).requires_grad_()
        weight = torch.randn(7, 6, 1, 1, requires_grad=True)
        ref, out = torch.nn.functional.conv2d(x, weight), pointwise_conv(x, weight)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(ref)
        expected, got = torch.autograd.grad(ref, (x, weight), grad), torch.autograd.grad(out, (x, weight), grad)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "side, kernel, groups, stride, autocast, path",
    [
        (2, 3, 16, 1, False, "small_map_depthwise"),
        (1, 3, 16, 1, False, "small_map_depthwise"),
        (4, 3, 16, 1, False, None),  # 16 pixels: oneDNN's depthwise kernel
        (2, 3, 1, 1, False, None),  # an ungrouped 3x3: no rule
        (2, 3, 16, 1, True, None),  # bf16 autocast keeps its own rule
        (4, 1, 1, 1, False, "pointwise_conv"),
        (1, 1, 1, 1, False, "pointwise_conv"),
        (8, 1, 1, 1, False, None),  # 64 pixels: oneDNN's kernel was as fast
        (4, 1, 1, 2, False, None),  # strided
        (4, 1, 1, 1, True, None),
    ],
)
def test_conv_bn_takes_small_map_products_only_in_fp32_on_small_maps(
    side, kernel, groups, stride, autocast, path, monkeypatch
):
    from tinyvit_lib import model as model_module

    torch.manual_seed(0)
    block = perturb_(model_module.ConvBN(16, 16, kernel, groups=groups, stride=stride))
    x = torch.randn(4, 16, side, side).contiguous(memory_format=torch.channels_last)
    calls = {name: [] for name in ("small_map_depthwise", "pointwise_conv")}
    for name in calls:
        real = getattr(model_module, name)
        monkeypatch.setattr(
            model_module, name, lambda *args, real=real, name=name: calls[name].append(1) or real(*args)
        )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x)
    block.small_map_products = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_onednn = block(x)
    assert {name: len(c) for name, c in calls.items()} == {name: int(name == path) for name in calls}
    torch.testing.assert_close(y, y_onednn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel, stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_a_one_channel_conv_bn_on_a_small_map_is_the_convolution(kernel, stride):
    # one channel is both depthwise and ungrouped: only a 1x1 stride-1 kernel may take the 1x1 product
    from tinyvit_lib import model as model_module

    torch.manual_seed(0)
    block = perturb_(model_module.ConvBN(1, 1, kernel, stride=stride))
    x = torch.randn(4, 1, 2, 2)
    y = block(x)
    block.small_map_products = False
    torch.testing.assert_close(y, block(x), atol=1e-5, rtol=1e-5)


def test_a_whole_fp32_step_with_small_map_products_matches_onednn(monkeypatch):
    from tinyvit_lib import model as model_module

    calls = {"depthwise": [], "pointwise": []}
    monkeypatch.setattr(
        model_module, "small_map_depthwise", lambda *a: calls["depthwise"].append(1) or small_map_depthwise(*a)
    )
    monkeypatch.setattr(model_module, "pointwise_conv", lambda *a: calls["pointwise"].append(1) or pointwise_conv(*a))
    torch.manual_seed(0)
    fast = perturb_(tinyvit_5m(img_size=32, num_classes=10)).train()
    slow = copy.deepcopy(fast)
    for m in slow.modules():
        if hasattr(m, "small_map_products"):
            m.small_map_products = False
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for model in (fast, slow):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    # depthwise: stage 2's six local convs, the merge into stage 3, stage 3's two (2x2 and 1x1 maps);
    # 1x1: the merges' on 4x4, 2x2 and 1x1 maps (the first merge's last, the next two's both)
    assert {name: len(c) for name, c in calls.items()} == {"depthwise": 9, "pointwise": 5}
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_inference_copy_of_a_model_fx_cannot_trace_runs_unfused():
    class Branchy(torch.nn.Module):  # control flow on a value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > -1e9 else x

    model = perturb_(Branchy())
    runner = inference_copy(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(runner(x), model.eval()(x), atol=1e-5)


def test_flops_5m_224():
    assert 1.24e9 < count_flops(tinyvit_5m()) / 2 < 1.28e9  # about 1.26 GMAC


# ------------------------------------------------------------------ bad input


def test_wrong_channel_count_is_refused():
    model = tinyvit_5m(img_size=28, in_chans=1)
    with pytest.raises(ValueError, match="in_chans=1.*3 channels"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 28, 28))


def test_checkpoint_of_another_variant_is_refused():
    model = tinyvit_5m()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(model, tinyvit_11m().state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_unloadable_checkpoints_are_refused(tmp_path):
    model = tinyvit_5m(img_size=32)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(model, garbage)
    weird = tmp_path / "weights.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint format '.bin'"):
        load_pretrained(model, weird)
    listed = tmp_path / "listed.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="holds a list, not a state dict of tensors"):
        read_weights(listed)


def test_the_fp32_shortcuts_keep_to_what_they_compute_exactly():
    """The small-map products read a convolution's weight directly: not with hooks on it (they
    would not run), not on an empty batch; and a bf16 model keeps bf16 under autocast."""
    model = tinyvit_5m(num_classes=10, img_size=32)
    assert model(torch.randn(0, 3, 32, 32)).shape == (0, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    calls = []
    for conv in convs:
        conv.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == len(convs)  # every convolution's hook ran
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tinyvit_5m(num_classes=10, img_size=32).bfloat16()(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    double = tinyvit_5m(num_classes=10, img_size=32).double()
    double.reset_classifier(5)  # the new head in the model's dtype
    assert double(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depths": (2, 2, 6)}, "one entry per stage"),
        ({"embed_dims": (64, 128, 161, 320)}, "not divisible by num_heads"),
        ({"in_chans": 0}, "in_chans"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"local_conv_size": 2}, "local_conv_size"),
        ({"img_size": 32.0}, "img_size=32.0 must be an integer"),
        ({"num_classes": 2.5}, "num_classes=2.5 must be an integer"),
        ({"embed_dims": (64.0, 128, 160, 320)}, "embed_dims=.* must hold positive integers"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio=inf must be finite"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyViT(TinyViTConfig(**kwargs))


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="num_class"):
        tinyvit_5m(num_class=10)


def test_inference_copy_leaves_the_global_rng_alone():
    # evaluate() makes one per epoch: drawing from the global RNG would move the run's drop path
    model = tinyvit_5m(img_size=32, num_classes=10)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    inference_copy(model)
    assert torch.equal(torch.rand(3), expected)


def test_small_map_products_train_after_a_first_call_under_inference_mode():
    # the tap geometry is cached: made under inference_mode it must still be saved for backward
    from tinyvit_lib.model import _tap_index_array, _tap_selector_array

    _tap_index_array.cache_clear()
    _tap_selector_array.cache_clear()
    conv = with_small_map_convs(torch.nn.Conv2d(4, 4, 3, padding=1))
    depthwise = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 4, 2, 2)
    with torch.inference_mode():
        conv(x)
        small_map_depthwise(x, depthwise.weight, 1, 1)
    (conv(x).sum() + small_map_depthwise(x, depthwise.weight, 1, 1).sum()).backward()
    assert conv.weight.grad is not None and depthwise.weight.grad is not None


def test_a_kernel_larger_than_the_padded_small_map_gets_the_convolution_error():
    conv = with_small_map_convs(torch.nn.Conv2d(4, 4, 3))  # no padding: a 2x2 map is too small
    with pytest.raises(RuntimeError, match="[Kk]ernel size"):
        conv(torch.randn(1, 4, 2, 2))


def test_tracing_the_model_leaves_no_fake_tensor_behind():
    """torch.export (what ONNX export runs) traces with fake tensors; the small-map geometry cached
    during a trace must not come back as fake tensors in a later real call."""
    from tinyvit_lib.model import _tap_index_array, _tap_selector_array

    _tap_index_array.cache_clear()
    _tap_selector_array.cache_clear()
    model = tinyvit_5m(img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.export.export(model, (x,))  # the first call of the small-map rules happens under tracing
    with torch.no_grad():
        out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 10)
