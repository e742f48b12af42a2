"""A trained model in the formats other code loads: a checkpoint for timm, safetensors, and ONNX.

timm's TinyViT (`timm.create_model("tiny_vit_5m_224", ...)`) uses this library's key names; what
differs is the windows. timm attends over fixed windows and pads a feature map smaller than its
window, while this library clips a window to its map. So a model trained at 32×32 (maps of 4, 2
and 1 in stages 1-3) becomes the timm model whose windows are the clipped ones, (7, 4, 2, 1), with
each attention-bias table cut to the offsets those windows hold; timm then computes the same
function. `save_timm_checkpoint` writes the state dict and returns the exact `create_model` call.

    call = save_timm_checkpoint(model, "student_timm.pth")
    # timm.create_model("tiny_vit_5m_224", num_classes=10, in_chans=1, window_sizes=[7, 4, 2, 1],
    #                   checkpoint_path="student_timm.pth")

ONNX (`save_onnx`) goes through torch.export with a dynamic batch size, and is checked in
onnxruntime against PyTorch on the inputs given (the largest logit difference is returned). The
model's input size, channels, normalisation and class names ride along in the ONNX metadata and the
safetensors header, so a runtime without this library can prepare an image and name the answer.

From the command line, over a checkpoint this library's trainer wrote:

    python -m tinyvit_lib.export runs/default/<run>/last.pt --out exported/ --to onnx timm safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import torch

from .data import DataSpec, dataset_eval_crop, dataset_normalisation, training_set, validation_set
from .experiment import load_trained
from .model import PRESETS, TinyViT, TinyViTConfig, inference_copy, stage_resolutions
from .utils import HelpFormatter, atomic_write, load_checkpoint

__all__ = [
    "export_checkpoint",
    "timm_name",
    "timm_window_sizes",
    "timm_state_dict",
    "timm_create_call",
    "save_timm_checkpoint",
    "save_safetensors",
    "save_onnx",
]

TIMM_NAMES = {"tinyvit_5m": "tiny_vit_5m_224", "tinyvit_11m": "tiny_vit_11m_224", "tinyvit_21m": "tiny_vit_21m_224"}


def timm_name(model: TinyViT) -> str:
    """timm's name for `model`'s variant ("tiny_vit_5m_224"): its widths and heads are a preset's, and
    every other field timm's variants fix (depths, the MLP and MBConv ratios, the local convolution)
    is the default; windows, resolution, channels, classes and drop path are timm arguments.

    Raises:
        ValueError: a TinyViT that is none of the three presets (timm has no name for it); the
            differing fields are named.
    """
    config, default = model.config, TinyViTConfig()
    fixed = [
        f
        for f in ("depths", "mlp_ratio", "mbconv_expand_ratio", "local_conv_size")
        if getattr(config, f) != getattr(default, f)
    ]
    for preset, fields in PRESETS.items():
        if (
            tuple(config.embed_dims) == fields["embed_dims"]
            and tuple(config.num_heads) == fields["num_heads"]
            and not fixed
        ):
            return TIMM_NAMES[preset]
    differs = (
        ", ".join(f"{f}={getattr(config, f)}" for f in fixed)
        or f"embed_dims={config.embed_dims}, num_heads={config.num_heads}"
    )
    raise ValueError(f"{differs}: not one of timm's TinyViT variants ({', '.join(TIMM_NAMES.values())})")


def timm_window_sizes(model: TinyViT) -> list[int]:
    """The windows timm needs to compute `model`'s function: each stage's window clipped to its map."""
    resolutions = stage_resolutions(model.config.img_size, len(model.config.window_sizes))
    return [min(w, r) for w, r in zip(model.config.window_sizes, resolutions, strict=True)]


def timm_state_dict(model: TinyViT) -> dict[str, torch.Tensor]:
    """`model`'s weights as timm's TinyViT with `timm_window_sizes` holds them: the same keys, each
    attention-bias table (heads, w*w) cut to the offsets of the clipped window (heads, c*c)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        table = getattr(module, "attention_biases", None)
        if table is None:
            continue
        window = module.window_size
        clipped = min(window, *module.grid)  # the largest window this block attends over
        heads = table.shape[0]
        state[f"{name}.attention_biases"] = (
            table.detach().view(heads, window, window)[:, :clipped, :clipped].reshape(heads, clipped * clipped).clone()
        )
    return state


def timm_create_call(model: TinyViT, checkpoint_path: str | Path) -> str:
    """The `timm.create_model(...)` call that loads `save_timm_checkpoint`'s file into the same function."""
    args = [repr(timm_name(model)), f"num_classes={model.config.num_classes}"]
    if model.config.in_chans != 3:
        args.append(f"in_chans={model.config.in_chans}")
    windows = timm_window_sizes(model)
    if windows != [7, 7, 14, 7]:
        args.append(f"window_sizes={windows}")
    args.append(f"checkpoint_path={str(checkpoint_path)!r}")
    return f"timm.create_model({', '.join(args)})"


def save_timm_checkpoint(model: TinyViT, path: str | Path) -> str:
    """Write `timm_state_dict(model)` to `path` (a plain state dict, as timm's `load_checkpoint` reads
    it) and return the `create_model` call that loads it.

    Raises:
        ValueError: a model timm has no variant for (`timm_name`).
        OSError: the file cannot be written (nothing is left half-written).
    """
    call = timm_create_call(model, path)  # checks the variant before anything is written
    state = timm_state_dict(model)
    atomic_write(path, lambda f: torch.save(state, f))
    return call


def save_safetensors(model: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """`model`'s state dict as safetensors (tensors only, no code), with `metadata` in the header (each
    value JSON-encoded, as the format holds strings), e.g. the model's config, class names and input normalisation.

    Raises:
        OSError: the file cannot be written (nothing is left half-written).
    """
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    header = {k: json.dumps(v) for k, v in (metadata or {}).items()}  # safetensors holds strings: each value as JSON
    data = save(state, metadata=header)
    atomic_write(path, lambda f: f.write(data))


FORMATS = ("onnx", "timm", "safetensors")
ONNX_TOLERANCE = 1e-4  # the largest logit difference onnxruntime may show against PyTorch in fp32


def save_onnx(model: torch.nn.Module, path: str | Path, inputs: torch.Tensor, metadata: dict | None = None) -> float:
    """Write `model` (in eval mode, fp32) as ONNX with a dynamic batch size and `metadata` (each value
    JSON-encoded) in the model's metadata, then run the file in onnxruntime on `inputs` (B, C, H, W)
    and return the largest |logit difference| against PyTorch's `model`.

    What is exported is `inference_copy(model)`: BatchNorm folded into the convolutions, and
    every convolution a Conv node (traced as it trains, the fp32 small-map rules of `ConvBN` and
    `SmallMapConv2d` would become transposes and matrix products that an ONNX runtime cannot fuse).

    Raises:
        ValueError: the difference exceeds `ONNX_TOLERANCE` (the file is removed).
        OSError: the file cannot be written.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    model = copy.deepcopy(model).eval().float()  # the caller's model keeps its mode and dtype
    folded = inference_copy(model).to(memory_format=torch.contiguous_format)
    trace = inputs if len(inputs) > 1 else inputs.repeat(2, 1, 1, 1)  # a batch of 1 would fix the batch size
    batch = torch.export.Dim("batch", min=1, max=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        torch.onnx.export(
            folded,
            (trace,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
        )
    graph = onnx.load(str(path))  # with any weights the exporter wrote beside it, which go inline below
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=json.dumps(value))
    data = graph.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # the exporter's, now inline
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {"image": inputs.numpy()})[0])
    with torch.no_grad():
        gap = float((theirs - model(inputs)).abs().max())
    if gap > ONNX_TOLERANCE:
        path.unlink()
        raise ValueError(f"onnxruntime differs from PyTorch by {gap:.2e} > {ONNX_TOLERANCE:g} on the check inputs")
    return gap


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Export the model of a checkpoint written by this library's trainer (`experiment.run`) into
    `out_dir`, one file per format (`<run>.onnx`, `<run>_timm.pth`, `<run>.safetensors`); returns one
    line per file (for ONNX, its difference from PyTorch in onnxruntime on the run's first validation
    images; for timm, the `create_model` call that loads it). The ONNX metadata and the safetensors
    header hold the model's description, its input's size, channels and normalisation (mean, std)
    and the class names.

    Raises:
        FileNotFoundError, ValueError: no readable checkpoint, one without the model's description, an
            unknown format, or a model timm has no variant for (all checked before anything is written).
        OSError: a file cannot be written.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and (checkpoint / "last.pt").is_file():  # a run folder: its final weights
        checkpoint = checkpoint / "last.pt"
    model = load_trained(checkpoint).to(memory_format=torch.contiguous_format)
    config = load_checkpoint(checkpoint)["model_config"]
    if "timm" in formats and not isinstance(model, TinyViT):
        raise ValueError(
            f"{checkpoint} holds a {config['name']}, not a TinyViT: timm's TinyViT cannot load it "
            "(--to onnx safetensors exports it)"
        )
    if "timm" in formats:
        timm_name(model)  # a variant timm knows, before anything is written
    stem, out_dir = checkpoint.resolve().parent.name, Path(out_dir)
    metadata = _metadata(config)
    lines = []
    if "onnx" in formats:
        images, real = _check_images(config)
        gap = save_onnx(model, out_dir / f"{stem}.onnx", images, metadata)
        inputs = f"{len(images)} " + ("validation images" if real else "random inputs (the run's data is not here)")
        lines.append(f"{out_dir / f'{stem}.onnx'} (onnxruntime vs PyTorch on {inputs}: max |Δlogit| {gap:.1e})")
    if metadata["classes"] is None:
        lines.append("note: no class names in the metadata (the checkpoint records none and its data is not here)")
    if "timm" in formats:
        lines.append(save_timm_checkpoint(model, out_dir / f"{stem}_timm.pth"))
    if "safetensors" in formats:
        save_safetensors(model, out_dir / f"{stem}.safetensors", metadata)
        lines.append(str(out_dir / f"{stem}.safetensors"))
    return lines


def _metadata(config: dict) -> dict:
    """What a runtime needs to use the model: its description, the input's size, channels and
    normalisation, and the class names (None where the run's data cannot be opened here)."""
    data = (config.get("spec") or {}).get("data") or {}
    mean, std = dataset_normalisation(data["dataset"]) if data.get("dataset") else (None, None)
    crop = dataset_eval_crop(data["dataset"]) if data.get("dataset") else None
    classes = config.get("classes")  # recorded by runs since they kept them; else read from the data
    if classes is None:
        try:
            classes = training_set(DataSpec(**data)).classes if data else None
        except (ValueError, FileNotFoundError, TypeError):
            classes = None
    return dict(
        model={k: config[k] for k in ("name", "num_classes", "in_chans", "img_size")},
        # a runtime prepares an image as the evaluation view does: shorter side to size / crop (bicubic),
        # center crop size x size, scale to [0, 1], (x - mean) / std per channel, NCHW
        input=dict(size=config["img_size"], channels=config["in_chans"], crop=crop, mean=mean, std=std, layout="NCHW"),
        classes=classes,
        dataset=data.get("dataset"),
    )


def _check_images(config: dict, count: int = 8) -> tuple[torch.Tensor, bool]:
    """Inputs to compare onnxruntime with PyTorch on, and whether they are images: the run's first
    validation images where its data opens here, else normalised noise of the model's input shape."""
    data = (config.get("spec") or {}).get("data")
    try:
        held_out = validation_set(DataSpec(**data))
        return torch.stack([held_out[i][0] for i in range(min(count, len(held_out)))]), True
    except (ValueError, FileNotFoundError, TypeError):
        generator = torch.Generator().manual_seed(0)
        shape = (count, config["in_chans"], config["img_size"], config["img_size"])
        return torch.randn(*shape, generator=generator), False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyvit_lib.export",
        description="Write a trained model (a checkpoint of this library's trainer) for other code to load.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="a run's last.pt or best.pt, or its folder (its last.pt)")
    p.add_argument("--out", default="exported", help="folder for the exported files")
    p.add_argument("--to", nargs="+", default=list(FORMATS), choices=FORMATS, help="formats to write")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 done (one line per file written); 2 bad input (one line on stderr, nothing written);
    1 a file that could not be written."""
    args = build_parser().parse_args(argv)
    try:
        lines = export_checkpoint(args.checkpoint, args.out, tuple(args.to))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
