"""Export: a checkpoint timm's TinyViT loads into the same function, safetensors with the input's
description, and the CLI over them (refusals in one line, nothing written)."""

import json
from dataclasses import replace

import pytest
import torch

from tinyvit_lib import load_pretrained, tinyvit_5m
from tinyvit_lib.data import DataSpec
from tinyvit_lib.experiment import RunSpec, load_trained, run
from tinyvit_lib.export import main, save_onnx, save_timm_checkpoint, timm_name, timm_state_dict, timm_window_sizes
from tinyvit_lib.trainer import TrainConfig
from tinyvit_lib.utils import load_checkpoint


def perturbed(**config) -> torch.nn.Module:
    """A TinyViT whose every weight (attention biases included) is off its initial value."""
    model = tinyvit_5m(**config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("img_size, in_chans", [(32, 1), (224, 3)])
def test_timm_loads_the_exported_checkpoint_into_the_same_function(tmp_path, img_size, in_chans):
    timm = pytest.importorskip("timm")
    ours = perturbed(img_size=img_size, num_classes=10, in_chans=in_chans)
    call = save_timm_checkpoint(ours, tmp_path / "student.pth")
    theirs = eval(call, {"timm": timm}).eval()  # the call the export prints, as a user would paste it
    x = torch.randn(2, in_chans, img_size, img_size)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    if img_size == 32:  # maps of 8, 4, 2, 1: timm's windows are the clipped ones, its bias tables cut to them
        assert timm_window_sizes(ours) == [7, 4, 2, 1] and "window_sizes=[7, 4, 2, 1]" in call and "in_chans=1" in call
        assert theirs.stages[1].blocks[0].attn.attention_biases.shape == (4, 16)
    else:
        assert "window_sizes" not in call and "in_chans" not in call


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> RunSpec:
    """A finished run of this library's trainer (synthetic data, one short epoch)."""
    out = tmp_path_factory.mktemp("runs")
    data = DataSpec(dataset="synthetic", img_size=32, max_per_class=4, max_val_per_class=2)
    spec = RunSpec(
        name="tiny", data=data, model="tinyvit_5m", output_dir=str(out), train=TrainConfig(epochs=1, batch_size=8)
    )
    run(spec, progress=False)
    return spec


def test_the_cli_writes_each_format_and_the_files_load(trained, tmp_path, capsys):
    assert main([str(trained.run_dir / "last.pt"), "--out", str(tmp_path)]) == 0
    onnx_line, timm_line, _ = capsys.readouterr().out.splitlines()
    assert "onnxruntime vs PyTorch on 8 validation images" in onnx_line and (tmp_path / "tiny.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.safetensors", "tiny_timm.pth"]  # no .data
    assert timm_line.startswith("timm.create_model('tiny_vit_5m_224', num_classes=10")
    assert (tmp_path / "tiny_timm.pth").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tiny.safetensors"), "pt") as f:
        header = {k: json.loads(v) for k, v in f.metadata().items()}
    assert (
        header["input"]["size"] == 32 and len(header["input"]["mean"]) == 3 and header["model"]["name"] == "tinyvit_5m"
    )
    assert header["classes"] == [f"pattern {k}" for k in range(10)]
    reloaded = load_pretrained(tinyvit_5m(img_size=32, num_classes=10), tmp_path / "tiny.safetensors").eval()
    original = load_trained(trained.run_dir / "last.pt")
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's check: the ONNX batch is dynamic
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert (reloaded(x) - original(x)).abs().max() <= 1e-5  # the same weights (memory layouts differ)
        assert (torch.from_numpy(session.run(None, {"image": x.numpy()})[0]) - original(x)).abs().max() <= 1e-4


def test_an_export_away_from_the_data_still_names_the_classes(trained, tmp_path, capsys):
    # The run records its class names; only the check's inputs need the data, and the line says so.
    ckpt = load_checkpoint(trained.run_dir / "last.pt")
    ckpt["model_config"]["spec"]["data"]["dataset"] = "imagenet"  # as if its image folder were elsewhere
    ckpt["model_config"]["spec"]["data"]["root"] = str(tmp_path / "gone")
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--to", "onnx", "safetensors"]) == 0  # a folder
    out = capsys.readouterr().out
    assert "on 8 random inputs (the run's data is not here)" in out and "note:" not in out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "run.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == [f"pattern {k}" for k in range(10)]
    del ckpt["model_config"]["classes"]  # a checkpoint from before runs kept them: said, not hidden
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert main([str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "out"), "--to", "safetensors"]) == 0
    assert "note: no class names in the metadata" in capsys.readouterr().out


def test_the_cli_refuses_in_one_line_and_writes_nothing(trained, tmp_path, capsys):
    teacher = replace(trained, name="teacher", model="resnet18")
    run(teacher, progress=False)
    out = tmp_path / "out"
    assert main([str(teacher.run_dir / "last.pt"), "--out", str(out), "--to", "timm"]) == 2
    assert "holds a resnet18, not a TinyViT" in capsys.readouterr().err and not out.exists()
    assert main([str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()


def test_onnx_runs_in_onnxruntime_as_in_pytorch_and_carries_the_input_description(tmp_path):
    # 224x224, one channel: stages 1-3 attend on maps of 28, 14, 7 in windows of 7, 14, 7 (16 windows per
    # map in stage 1). The CLI's test exports a trained model at 32x32 with three channels (each export
    # takes seconds).
    img_size, in_chans = 224, 1
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = perturbed(img_size=img_size, num_classes=10, in_chans=in_chans).train()
    inputs = torch.randn(1, in_chans, img_size, img_size)  # one image: the export must not fix the batch at 1
    gap = save_onnx(model, tmp_path / "m.onnx", inputs, dict(input=dict(size=img_size), classes=list("abcdefghij")))
    assert gap <= 1e-4 and model.training  # the caller's model is left as it was
    model.eval()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    five = torch.randn(5, in_chans, img_size, img_size)  # another batch size: the batch is dynamic
    with torch.no_grad():
        assert (torch.from_numpy(session.run(None, {"image": five.numpy()})[0]) - model(five)).abs().max() <= 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["input"]["size"] == img_size and meta["classes"][0] == "a"


def test_onnx_holds_the_folded_model_with_plain_convolutions(tmp_path):
    # At 32x32 in fp32 the training model computes its merges' 1x1 and small depthwise convolutions as
    # matrix products; the file must hold Conv nodes for every convolution and no BatchNorm.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = perturbed(img_size=32, num_classes=10)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    gap = save_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert gap <= 1e-4
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Conv") == convs and "BatchNormalization" not in ops


def test_a_student_starts_from_released_weights_of_another_head_resolution_and_channel_count(tmp_path, capsys):
    from safetensors.torch import save_file

    from tinyvit_lib.model import ours_to_official
    from tinyvit_lib.teachers import start_from

    released = perturbed(
        img_size=224, num_classes=1000
    )  # stands for tiny_vit_5m_22kto1k_distill.pth (RGB, 1000 classes)
    official = tmp_path / "tiny_vit_5m_22kto1k_distill.pth"
    torch.save({"model": ours_to_official(released.state_dict())}, official)
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    for path in (official, tmp_path / "timm.safetensors"):
        student = tinyvit_5m(img_size=64, num_classes=10, in_chans=1)
        head = student.head.fc.weight.clone()
        notes = start_from(student, path)
        assert notes == [
            "head replaced: the checkpoint classifies 1000 classes, the model 10",
            "first convolution adapted from 3 input channels to 1",
        ]
        assert torch.equal(student.head.fc.weight, head)  # the new head keeps its initialisation
        assert torch.equal(student.stages[3].blocks[0].mlp.fc1.weight, released.stages[3].blocks[0].mlp.fc1.weight)
        first = released.patch_embed.conv1.conv.weight.sum(dim=1, keepdim=True)
        assert torch.allclose(student.patch_embed.conv1.conv.weight, first)  # a gray image: the same response
    # through a run: the notes are in its log
    data = DataSpec(dataset="synthetic", img_size=32, max_per_class=4, max_val_per_class=2)
    spec = RunSpec(
        name="from_released", data=data, model="tinyvit_5m", output_dir=str(tmp_path), init_from=str(official)
    )
    from tinyvit_lib.experiment import prepare_run

    prepare_run(spec)
    assert (
        "from_released: head replaced: the checkpoint classifies 1000 classes, the model 10" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "name, suffix", [("timm:resnet18", ".safetensors"), ("timm:resnet18", ".pth"), ("resnet18", ".pth")]
)
def test_a_teacher_starts_from_a_timm_or_torchvision_weights_file_with_its_head_replaced(tmp_path, name, suffix):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    from tinyvit_lib.teachers import build_model, start_from

    released = build_model(name, num_classes=1000, in_chans=3)  # stands for the library's own weights file
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in released.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    teacher = build_model(name, num_classes=10, in_chans=1)
    notes = start_from(teacher, path)
    assert notes[0] == "first convolution adapted from 3 input channels to 1" and notes[1].startswith("head replaced")
    assert torch.equal(teacher.layer4[1].conv2.weight, released.layer4[1].conv2.weight)


def test_a_weights_file_of_another_model_is_refused_naming_the_library_model_and_keys(tmp_path):
    pytest.importorskip("timm")
    from tinyvit_lib.teachers import build_model, start_from

    torch.save(build_model("timm:resnet18", num_classes=10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet.pth does not fit timm's ConvNeXt: .*missing key") as error:
        start_from(build_model("timm:convnext_atto", num_classes=10), tmp_path / "resnet.pth")
    assert "unexpected key" in str(error.value)
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_model("timm:no_such_net", num_classes=10)


def test_a_timm_export_loads_back_into_the_same_function_and_only_timm_variants_are_named():
    # at 32x32 each bias table is cut to its clipped window; loading it back fills those offsets exactly
    ours = perturbed(img_size=32, num_classes=10)
    again = tinyvit_5m(img_size=32, num_classes=10).eval()
    load_pretrained(again, timm_state_dict(ours))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
    with pytest.raises(ValueError, match=r"depths=\(2, 2, 2, 2\): not one of timm's TinyViT variants"):
        timm_name(tinyvit_5m(depths=(2, 2, 2, 2)))


def test_a_classifier_without_a_linear_head_is_refused_by_name(tmp_path):
    from tinyvit_lib.teachers import build_model, start_from

    teacher = build_model("squeezenet1_1", num_classes=10)  # its classifier is a convolution
    torch.save(teacher.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="SqueezeNet has no head this can replace"):
        start_from(teacher, tmp_path / "w.pth")
