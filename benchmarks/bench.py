"""`python -m benchmarks.bench` (`make bench`): how fast is this TinyViT, and is fast distillation fast?

Prints, from one run on this machine:
  * training and inference images/s of our TinyViT-5M and of timm's `tiny_vit_5m_224`, at 32x32
    and 224x224, with our speed as a ratio of timm's. timm runs twice: with its default windows
    (7, 7, 14, 7 whatever the input: a 2x2 map is padded to a 14x14 window) and with the windows our
    model uses (each clipped to its stage's map), which is the same computation as ours. At 224 the
    two timm models are one model, measured once;
  * each row's FLOP rate as a fraction of this machine's peak for its precision, the peak measured
    in the same run (a large fp32 and a large bf16 matmul);
  * the convolutions that the library's CPU speed rules single out (strided and tiny-map depthwise
    convolutions kept in fp32 under bf16 autocast, and computed as mixing matrices in fp32; a
    one-pixel output, and in fp32 a 2x2 map, as a matrix product, and a 3x3 convolution on a 4x4
    or 8x8 map by Winograd's F(4x4, 3x3)), forward and backward in fp32,
    in bf16 as oneDNN runs them, and through the rules in bf16 and in fp32;
  * the cost of a training step that distills from a logit store, and from an online teacher,
    relative to a plain cross-entropy step, and the precompute's throughput;
  * the trainer end to end: an epoch of `train_one_epoch` (data, views, teacher, step, bookkeeping)
    against its bare steps, for the students at 32 and 224 (labels, store, online teacher), at 32
    on mixed views (labels, a mixed store), and the ResNet-18 teacher (and the teacher on the
    trainer's path before the speed work); timm's matched eager step is timed in turns with the
    student's epochs at 32, for the ratio of the two;
  * where a training step's time goes, per model and size (the student and the teacher at 32 and 224):
    its FLOP rate against the matmul peak and its operators timed one by one (`step_profile`);
  * the logit store at the paper's scale: one epoch of 13.2M records written and read at random
    (`store_bench`; `--store-dir` puts it on the disk to measure).

Every contender runs under each policy alike:
  eager  fp32, NCHW input, AdamW, inference in eval mode: the models as their code ships (ours
         makes its input channels-last itself);
  fast   channels-last input and weights, bf16 autocast where the CPU has native bf16 (emulated,
         it is 7-10x slower) for training and inference at every size, AdamW
         with fused=True, BatchNorm folded into the convolutions for inference: what `train` and
         `evaluate` use by default (the teacher's inference stays fp32: its logits are the targets).
  compiled  fast, then torch.compile (inductor; for inference with freezing). Not run unless
         asked (--policies): compiling takes 20-60 s per inference graph and minutes per training
         graph on a 2-core CPU (the "warm-up" column); inductor caches it for later runs.
Ratios compare ours with timm under the same policy; ours under a faster policy over timm under
eager is reported apart (that is the speed-up a user of timm as shipped would see).

A training step is forward, cross-entropy, backward and an optimizer step on random data; each
figure is the median over timed samples (half a second of steps) after warm-up steps, the
contenders sampled in turns so that a slow moment hits them all. On Linux, a sample during which
other processes used more than a fifth of a core is set aside and taken again (up to three times
as many rounds); the table says how many were. Each row also gives the slowest and fastest of
timm-matched's samples: under AVX2 caps timm's step runs at one of two speeds (oneDNN's weight
gradient of its depthwise convolutions on 2x2 and 1x1 maps), which moves every ratio to it.
Timings are a measurement, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.onnx_bench import onnx_section
from benchmarks.step_profile import profile_section
from benchmarks.store_bench import store_section
from tinyvit_lib.augment import AUGMENT_PRESETS, MIX_PRESETS
from tinyvit_lib.data import get_dataset
from tinyvit_lib.distill import DistillationLoss, OnlineTeacher, StoredTeacher, precompute
from tinyvit_lib.model import (
    ConvBN,
    TinyViT,
    default_window_sizes,
    fuse_for_inference,
    stage_resolutions,
    tinyvit_5m,
    with_small_map_convs,
)
from tinyvit_lib.teachers import build_model
from tinyvit_lib.trainer import TrainConfig, TrainState, _build, pick_device, train_one_epoch, train_step
from tinyvit_lib.utils import cpu_has_native_bf16, keep_freed_memory

# (task, img_size) -> batch size. Training batches are the course's; inference batches are twice.
SECTIONS: dict[str, tuple[str, int, int]] = {
    "train32": ("train", 32, 128),
    "infer32": ("infer", 32, 256),
    "train224": ("train", 224, 32),
    "infer224": ("infer", 224, 64),
}
ALL_SECTIONS = (*SECTIONS, "kernels", "distill", "epoch", "profile", "store", "onnx")
NUM_CLASSES = 1000
CONTENDED_SHARE = 0.2  # other processes' CPU use during a sample, in cores, above which it is retimed
FULL_SAMPLE_S = 0.5  # a timed sample is this long at least: several steps of a fast contender
QUICK_SAMPLE_S = 0.05  # --quick: a smoke run, whose numbers time nothing
SAMPLE_S = FULL_SAMPLE_S  # what this run uses (main sets it)
PEAK_SIDE, PEAK_SIDE_QUICK = 2048, 256  # the peak's square matmul


@dataclass(frozen=True)
class Policy:
    """How a contender is run; every contender of a row runs under the same policy."""

    name: str
    channels_last: bool = False
    bf16_training: bool = False  # bf16 autocast for training (at every size)
    bf16_inference: bool = False  # bf16 autocast for inference (at every size)
    fold_bn: bool = False  # inference only
    fused_adamw: bool = False
    compile: bool = False

    def bf16(self, task: str, device: torch.device) -> bool:
        """bf16 autocast for this task ("train" or "infer") on `device`, where bf16 is native there (a CUDA
        GPU, or a CPU with AVX512-BF16 / AMX): training where `bf16_training`, inference where `bf16_inference`."""
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        if task == "infer":
            return self.bf16_inference and native
        return self.bf16_training and native


FAST = Policy("fast", channels_last=True, bf16_training=True, bf16_inference=True, fold_bn=True, fused_adamw=True)
POLICIES = {"eager": Policy("eager"), "fast": FAST, "compiled": replace(FAST, name="compiled", compile=True)}
DEFAULT_POLICIES = ("eager", "fast")


# ----------------------------------------------------------------------------- machine


def machine() -> dict:
    """CPU model, cores, threads, library versions and the accelerator, if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    return dict(
        cpu=cpu,
        isa=torch.backends.cpu.get_cpu_capability(),  # PyTorch's kernels (ATEN_CPU_CAPABILITY caps it)
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        mkl_isa=os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default"),  # torch.matmul and nn.Linear go through MKL
        native_bf16=cpu_has_native_bf16(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        timm=timm.__version__,
        python=platform.python_version(),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )


def matmul_step(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], None]:
    """One square matmul of side `n` in `dtype` (2 n^3 FLOPs): what the peak is measured on."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))

    def step() -> None:
        torch.mm(a, b)

    return step


def matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul (2 n^3 FLOPs) in `dtype`, median of `repeats` samples: the
    ceiling that every row's FLOP rate is a fraction of. Where bf16 is emulated, so is this figure."""
    step = matmul_step(device, dtype, n)
    seconds = [_timed(step, device)[0] for _ in range(2)]
    per_sample = max(1, round(SAMPLE_S / seconds[-1]))
    return 2 * n**3 / statistics.median(_timed(step, device, per_sample)[0] for _ in range(repeats))


def matmul_peaks(device: torch.device, *, quick: bool) -> dict[str, float]:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of `matmul_peak` (a small, single sample with `quick`), printed."""
    n, repeats = (PEAK_SIDE_QUICK, 1) if quick else (PEAK_SIDE, 5)
    # Where bf16 is emulated (and so never autocast) a full measure of it takes minutes: a small one.
    n_bf16, repeats_bf16 = (256, 1) if device.type == "cpu" and not cpu_has_native_bf16() else (n, repeats)
    peaks = {
        "fp32": matmul_peak(device, torch.float32, n=n, repeats=repeats),
        "bf16": matmul_peak(device, torch.bfloat16, n=n_bf16, repeats=repeats_bf16),
    }
    print(
        f"matmul peak (this run): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s ({n}x{n}), bf16 {peaks['bf16'] / 1e9:.1f}"
        f" GFLOP/s ({n_bf16}x{n_bf16}); native bf16: {cpu_has_native_bf16()}"
    )
    return peaks


def flops_per_image(model: nn.Module, task: str, img_size: int) -> float:
    """FLOPs (a multiply-add counts 2) of one image: the forward pass as torch's FlopCounterMode counts
    it (matmuls, convolutions, attention; not elementwise work), three times that for a training
    step (the usual rule: the backward pass costs twice the forward; FlopCounterMode's own count of
    a depthwise convolution's backward is 14x its forward here, not a cost the kernels pay).
    Convolutions count every kernel tap, padding included (the usual convention), also where
    `SmallMapConv2d` skips the taps that meet only padding or does fewer multiplies
    (Winograd's F(4x4, 3x3)): the rate is the convolution's work over the time it took."""
    images = torch.randn(2, 3, img_size, img_size)
    plain = with_small_map_convs(copy.deepcopy(model).eval(), undo=True)
    for m in plain.modules():
        if isinstance(m, ConvBN):
            m.small_map_products = False  # its tiny-map products are elementwise, which the counter skips
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        plain(images)
    return counter.get_total_flops() / len(images) * (3 if task == "train" else 1)


def _others_cpu_seconds() -> float:
    """CPU seconds used so far by every process but this one (Linux; 0 elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK") - time.process_time()


# ----------------------------------------------------------------------------- contenders


def matched_window_sizes(img_size: int) -> tuple[int, ...]:
    """The windows our model attends at this size: the official ones clipped to each stage's map."""
    return tuple(min(w, r) for w, r in zip(default_window_sizes(img_size), stage_resolutions(img_size)))


def contenders(timm, img_size: int, num_classes: int = NUM_CLASSES) -> dict[str, Callable[[], nn.Module]]:
    """Builders of ours, timm-default and (where it differs from default) timm-matched."""
    builders = {
        "ours": lambda: tinyvit_5m(img_size=img_size, num_classes=num_classes),
        "timm_default": lambda: timm.create_model("tiny_vit_5m_224", num_classes=num_classes),
    }
    if matched_window_sizes(img_size) != default_window_sizes(224):
        builders["timm_matched"] = lambda: timm.create_model(
            "tiny_vit_5m_224", num_classes=num_classes, window_sizes=list(matched_window_sizes(img_size))
        )
    return builders


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy in eval mode with every convolution + BatchNorm folded into one convolution."""
    if isinstance(model, TinyViT):
        return fuse_for_inference(model)
    from timm.models.tiny_vit import ConvNorm

    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvNorm):
                setattr(module, name, child.fuse())
    return folded


def make_step(
    model: nn.Module,
    task: str,
    policy: Policy,
    img_size: int,
    batch: int,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, AdamW) or one inference batch of a model
    with `num_classes` outputs."""
    memory_format = torch.channels_last if policy.channels_last else torch.contiguous_format
    model = model.to(device).train(task == "train")
    if task == "infer" and policy.fold_bn:
        model = fold_batchnorm(model)
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    bf16 = policy.bf16(task, device)
    if policy.compile:  # for inference, freezing bakes the weights in so conv, bias and GELU fuse
        model = torch.compile(model, options={"freezing": task == "infer"})
    if task == "infer":

        def infer() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                model(images)

        return infer

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=policy.fused_adamw or None)

    def train() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


# ----------------------------------------------------------------------------- timing


def _timed(step: Callable[[], None], device: torch.device, times: int = 1) -> tuple[float, float]:
    """(seconds per step, other processes' CPU use in cores) of `times` steps in a row."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    others, t0 = _others_cpu_seconds(), time.perf_counter()
    for _ in range(times):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds / times, (_others_cpu_seconds() - others) / seconds


def time_in_turns(
    steps: dict[str, Callable[[], None]],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    samples: dict[str, list[float]] | None = None,
) -> tuple[dict[str, float], dict[str, float], int]:
    """Median seconds per step of each contender, timed in turns, one sample each per round.

    A sample is as many steps as fill SAMPLE_S (at least one), judged from the last warm-up step.
    Returns (median seconds, seconds of each contender's warm-up, samples set aside as contended);
    `samples`, where given, receives each contender's seconds per step of the samples the medians use.
    Warm-up holds the one-off costs: compilation (timm's model compiles twice: its attention-bias
    cache changes on the first call), oneDNN kernel choice, allocator growth. At least one step.
    """
    warmup_s, per_sample = {}, {}
    for name, step in steps.items():
        seconds = [_timed(step, device)[0] for _ in range(max(warmup, 1))]
        warmup_s[name] = sum(seconds)
        per_sample[name] = max(1, round(SAMPLE_S / seconds[-1]))
    clean: dict[str, list[float]] = {name: [] for name in steps}
    every: dict[str, list[float]] = {name: [] for name in steps}
    contended = 0
    names = list(steps)
    for round_ in range(3 * repeats):
        if min(len(v) for v in clean.values()) >= repeats:
            break
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # who goes first rotates
            seconds, others = _timed(steps[name], device, per_sample[name])
            every[name].append(seconds)
            if others <= CONTENDED_SHARE:
                clean[name].append(seconds)
            else:
                contended += 1
    used = {name: clean[name] or every[name] for name in steps}
    if samples is not None:
        samples.update(used)
    return {name: statistics.median(used[name]) for name in steps}, warmup_s, contended


def measure(
    timm,
    section: str,
    policy: Policy,
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    peaks: dict[str, float],
    batch: int | None = None,
) -> dict:
    """One row: images/s of every contender for a section under a policy, ours' ratios, and each
    contender's FLOP rate as a fraction of the matmul peak of the precision it computes in: the
    run's (`peaks`), and the same matmul's timed in turns with the contenders, so that the fraction
    holds on a machine whose speed drifts between the peak's measure and the row's (the row's count
    of contended samples includes the matmul's)."""
    task, img_size, default_batch = SECTIONS[section]
    batch = batch or default_batch
    steps, flops = {}, {}
    for name, build in contenders(timm, img_size).items():
        torch.manual_seed(0)
        model = build()
        flops[name] = flops_per_image(model, task, img_size)
        steps[name] = make_step(model, task, policy, img_size, batch, device)
    precision = "bf16" if policy.bf16(task, device) else "fp32"
    n = PEAK_SIDE_QUICK if SAMPLE_S < FULL_SAMPLE_S else PEAK_SIDE  # --quick, as `matmul_peaks` sizes it
    steps["peak"] = matmul_step(device, torch.bfloat16 if precision == "bf16" else torch.float32, n)
    samples: dict[str, list[float]] = {}
    seconds, warmup_s, contended = time_in_turns(steps, warmup=warmup, repeats=repeats, device=device, samples=samples)
    peak_in_turns = 2 * n**3 / seconds.pop("peak")
    warmup_s.pop("peak")
    speed = {name: batch / s for name, s in seconds.items()}
    of_peak = {name: speed[name] * flops[name] / peaks[precision] for name in speed}
    of_peak_in_turns = {name: speed[name] * flops[name] / peak_in_turns for name in speed}
    speed.setdefault("timm_matched", speed["timm_default"])  # 224: the matched windows are the default ones
    # timm's step has two speeds under AVX2 caps (docs/performance.md): its samples' spread shows which it ran at
    matched = samples.get("timm_matched", samples["timm_default"])
    matched_range = (batch / max(matched), batch / min(matched))
    return dict(
        section=section,
        task=task,
        img_size=img_size,
        batch=batch,
        policy=policy.name,
        bf16=policy.bf16(task, device),
        images_per_s=speed,
        ours_vs_timm_default=speed["ours"] / speed["timm_default"],
        ours_vs_timm_matched=speed["ours"] / speed["timm_matched"],
        timm_matched_images_per_s_range=matched_range,
        flops_per_image=flops,
        fraction_of_peak=of_peak,
        peak_in_turns_gflops=peak_in_turns / 1e9,
        fraction_of_peak_in_turns=of_peak_in_turns,
        warmup_s=warmup_s,
        contended_samples=contended,
    )


# ----------------------------------------------------------------------------- distillation


def distill_section(*, device, warmup: int, repeats: int, batch: int = 128, samples: int = 4096) -> dict:
    """Step cost of the 5M student at 32x32 (10 classes): labels only, from a store, online; and the
    precompute's throughput over `samples` synthetic images against the teacher's bare inference.

    The three steps are timed in turns like the models above. The teacher is warmed up before
    either throughput is taken; the precompute's figure is its whole wall time (weights hash,
    data loading, inference, top-k, writing with fsync, checksums and manifest), and the bare
    inference is the median of batches timed before and after it.
    """
    dataset = get_dataset("synthetic", split="train", num_samples=samples, in_chans=3)
    teacher = build_model("resnet18", num_classes=10, img_size=32).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        precompute_s, teacher_infer = _precompute_and_bare_inference(
            teacher, dataset, store, device=device, warmup=warmup, repeats=repeats
        )
        sources = {
            "cross-entropy": None,
            "from store": StoredTeacher.open(store, dataset),
            "online teacher": OnlineTeacher(teacher).to(device),
        }
        times, contended = _distill_steps(sources, dataset, device=device, warmup=warmup, repeats=repeats, batch=batch)
    result = dict(
        step_s=times,
        store_vs_ce=times["from store"] / times["cross-entropy"],
        online_vs_ce=times["online teacher"] / times["cross-entropy"],
        contended_samples=contended,
        precompute_images_per_s=samples / precompute_s,
        teacher_infer_images_per_s=teacher_infer,
        precompute_vs_inference=samples / precompute_s / teacher_infer,
    )
    note = f" ({contended} contended samples retimed)" if contended else ""
    print(
        f"distillation step (TinyViT-5M, 32x32, batch {batch}): plain CE {times['cross-entropy'] * 1e3:.1f} ms, "
        f"from store {result['store_vs_ce']:.3f}x, online ResNet-18 teacher {result['online_vs_ce']:.3f}x{note}"
    )
    print(
        f"precompute of {samples} images: {result['precompute_images_per_s']:.0f} images/s = "
        f"{result['precompute_vs_inference']:.0%} of the teacher's bare inference ({teacher_infer:.0f} images/s), "
        f"including data loading and writing"
    )
    return result


def _precompute_and_bare_inference(
    teacher: nn.Module, dataset, store: Path, *, device, warmup: int, repeats: int
) -> tuple[float, float]:
    """(seconds of a whole precompute into `store`, the teacher's bare images/s on batches of 256)."""
    teacher_batch = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))]).to(device)  # (256, 3, 32, 32)

    def teacher_step() -> None:
        with torch.no_grad():
            teacher(teacher_batch)

    for _ in range(max(warmup, 1)):
        teacher_step()
    bare = [_timed(teacher_step, device)[0] for _ in range(repeats)]
    t0 = time.perf_counter()
    precompute(teacher, dataset, store, k=10, batch_size=256, device=device, progress=False)
    precompute_s = time.perf_counter() - t0
    bare += [_timed(teacher_step, device)[0] for _ in range(repeats)]
    return precompute_s, len(teacher_batch) / statistics.median(bare)


def _distill_steps(
    sources: dict, dataset, *, device, warmup: int, repeats: int, batch: int
) -> tuple[dict[str, float], int]:
    """Seconds per TinyViT-5M training step with each teacher source (None: labels only), timed in
    turns; and how many contended samples were retimed."""
    images = torch.stack([dataset[i][0] for i in range(batch)]).to(device)
    labels = torch.tensor([dataset.targets[i] for i in range(batch)], device=device)
    ids = torch.arange(batch)
    student = tinyvit_5m(img_size=32, num_classes=10).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ce, kd = DistillationLoss(alpha=0.0), DistillationLoss(alpha=0.5, temperature=1.0)

    def step(source) -> Callable[[], None]:
        def run() -> None:
            teacher_logits = None if source is None else source.logits(images, ids, 0)
            loss = (ce if source is None else kd)(student(images), labels, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    steps = {name: step(source) for name, source in sources.items()}
    times, _, contended = time_in_turns(steps, warmup=warmup, repeats=repeats, device=device)
    return times, contended


# ----------------------------------------------------------------------------- the convolution rules


@dataclass(frozen=True)
class KernelCase:
    """A convolution that one of the library's CPU speed rules singles out, at the course's batch."""

    label: str
    # ConvBN's "depthwise in fp32" and "1x1 as a matmul"; SmallMapConv2d's "small map as a matmul"
    # and "Winograd F(4x4, 3x3)"
    rule: str
    channels: int
    size: int  # the input map, size x size
    stride: int = 1


KERNEL_CASES = (
    KernelCase("depthwise 3x3 stride 2 on 8x8", "depthwise in fp32", 128, 8, stride=2),  # TinyViT-5M at 32
    KernelCase("depthwise 3x3 on 2x2", "depthwise in fp32", 160, 2),
    KernelCase("depthwise 3x3 stride 2 on 2x2", "depthwise in fp32", 320, 2, stride=2),
    KernelCase("depthwise 3x3 on 1x1", "depthwise in fp32", 320, 1),
    KernelCase("1x1 on 4x4", "1x1 as a matmul", 128, 4),  # TinyViT-5M's merges at 32
    KernelCase("1x1 on 2x2", "1x1 as a matmul", 160, 2),
    KernelCase("1x1 on 1x1", "1x1 as a matmul", 320, 1),
    KernelCase("3x3 on 8x8 (ResNet-18's first stage)", "Winograd F(4x4, 3x3)", 64, 8),
    KernelCase("3x3 on 4x4 (ResNet-18's second stage)", "Winograd F(4x4, 3x3)", 128, 4),
    KernelCase("3x3 on 2x2 (ResNet-18's third stage)", "small map as a matmul", 256, 2),
    KernelCase("3x3 on 1x1 (ResNet-18's last stage)", "small map as a matmul", 512, 1),
)


def _kernel_variants(case: KernelCase) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]]:
    """{name: (forward, under bf16 autocast)}: the layer as oneDNN runs it in fp32 and in bf16, and
    the library's layer in bf16 (its bf16 rule, which may leave parts in fp32) and in fp32 (where
    `ConvBN` computes a depthwise convolution on a map of at most 4 pixels as `small_map_depthwise`
    and a 1x1 one on a map of at most 16 as `pointwise_conv`)."""
    if case.rule in ("depthwise in fp32", "1x1 as a matmul"):
        depthwise = case.rule == "depthwise in fp32"
        kernel, groups = (3, case.channels) if depthwise else (1, 1)
        layer = ConvBN(case.channels, case.channels, kernel, stride=case.stride, groups=groups)

        def plain(x: torch.Tensor) -> torch.Tensor:
            return nn.Sequential.forward(layer, x)  # ConvBN without its rules

        return {
            "fp32": (plain, False),
            "bf16": (plain, True),
            "bf16, rule": (layer, True),
            "fp32, rule": (layer, False),
        }
    plain_conv = nn.Conv2d(case.channels, case.channels, 3, padding=1, bias=False)
    rule = with_small_map_convs(copy.deepcopy(plain_conv))
    return {
        "fp32": (plain_conv, False),
        "bf16": (plain_conv, True),
        "bf16, rule": (rule, True),
        "fp32, rule": (rule, False),
    }


def _layer_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, bf16: bool) -> Callable[[], None]:
    """One forward and backward of `forward` on `x` (which requires grad), under bf16 autocast or not."""

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        out.float().sum().backward()

    return step


def kernel_section(*, device: torch.device, warmup: int, repeats: int, batch: int) -> list[dict]:
    """Forward and backward (input and weight gradients) of each `KERNEL_CASES` layer, channels-last,
    as oneDNN runs it in fp32 and in bf16 autocast, and through the library's rules in bf16 and in
    fp32, timed in turns: the evidence for `model.ConvBN`'s fp32 depthwise convolutions under bf16,
    its `small_map_depthwise` and `pointwise_conv` in fp32, and `SmallMapConv2d` (its products and
    Winograd's algorithm)."""
    print(
        "the convolution rules (forward + backward, ms: oneDNN in fp32 and in bf16 autocast, and the library's "
        "layer in bf16 and in fp32; speed-ups of the rule in bf16 over oneDNN's bf16 and fp32, and in fp32)"
    )
    print(
        f"{'layer':<38}{'batch':>6}{'fp32':>9}{'bf16':>9}{'rule bf16':>10}{'rule fp32':>10}"
        f"{'bf16 rule/bf16':>15}{'/fp32':>7}{'fp32 rule/fp32':>15}"
    )
    rows = []
    for case in KERNEL_CASES:
        torch.manual_seed(0)
        shape = (batch, case.channels, case.size, case.size)
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
        variants = _kernel_variants(case)
        for forward, _ in variants.values():
            if isinstance(forward, nn.Module):
                forward.to(device=device, memory_format=torch.channels_last)
        steps = {name: _layer_step(forward, x, bf16=bf16) for name, (forward, bf16) in variants.items()}
        times, _, _ = time_in_turns(steps, warmup=warmup, repeats=repeats, device=device)
        ms = {name: seconds * 1e3 for name, seconds in times.items()}
        row = dict(layer=case.label, rule=case.rule, batch=batch, ms=ms)
        row["rule_vs_bf16"], row["rule_vs_fp32"] = ms["bf16"] / ms["bf16, rule"], ms["fp32"] / ms["bf16, rule"]
        row["fp32_rule_vs_fp32"] = ms["fp32"] / ms["fp32, rule"]
        rows.append(row)
        print(
            f"{case.label:<38}{batch:>6}{ms['fp32']:>9.2f}{ms['bf16']:>9.2f}{ms['bf16, rule']:>10.2f}"
            f"{ms['fp32, rule']:>10.2f}{row['rule_vs_bf16']:>14.2f}x{row['rule_vs_fp32']:>6.2f}x"
            f"{row['fp32_rule_vs_fp32']:>14.2f}x",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- the trainer end to end


@dataclass(frozen=True)
class EpochCase:
    """One row of the epoch section: a model trained by the course's trainer on synthetic images."""

    label: str
    model: str
    img_size: int
    batch: int
    source: str | None = None  # the teacher's distribution: None (labels only), "store" or "online"
    # the trainer's path before the speed work: NCHW, plain AdamW, per-call v2 views, plain convolutions
    old_path: bool = False
    mix: bool = False  # views mixed in pairs (the "full" mix preset), from the store too
    in_turns_with: str | None = None  # the label of a case whose samples alternate with this one's


EPOCH_CLASSES = 10  # the synthetic data's classes: the epoch rows' heads, and timm's reference step's
EPOCH_CASES = (
    EpochCase("student 32, labels", "tinyvit_5m", 32, 128),
    EpochCase("student 32, store", "tinyvit_5m", 32, 128, "store"),
    EpochCase("student 32, online", "tinyvit_5m", 32, 128, "online"),
    EpochCase("student 32, mixed, labels", "tinyvit_5m", 32, 128, mix=True),
    EpochCase("student 32, mixed, store", "tinyvit_5m", 32, 128, "store", mix=True),
    EpochCase("student 224, labels", "tinyvit_5m", 224, 32),
    EpochCase("student 224, store", "tinyvit_5m", 224, 32, "store"),
    EpochCase("student 224, online", "tinyvit_5m", 224, 32, "online"),
    EpochCase("teacher 32", "resnet18", 32, 128),
    EpochCase("teacher 32, old path", "resnet18", 32, 128, old_path=True, in_turns_with="teacher 32"),
)


def _epoch_data_and_teacher(case: EpochCase, *, device: torch.device, samples: int, epochs: int, tmp: Path):
    """(synthetic training set, teacher) of an `EpochCase`: the store is precomputed in `tmp` once."""
    augment = AUGMENT_PRESETS["light"]
    dataset = get_dataset(
        "synthetic",
        split="train",
        img_size=case.img_size,
        in_chans=3,
        augment=augment,
        num_samples=samples,
        mix=MIX_PRESETS["full"] if case.mix else None,
    )
    if case.old_path:
        dataset.transform = dataset.transform.reference  # one v2 call per step and sample, as before
    if case.source is None:
        return dataset, None
    torch.manual_seed(0)
    teacher_net = build_model("resnet18", num_classes=EPOCH_CLASSES, img_size=case.img_size)
    if case.source == "online":
        return dataset, OnlineTeacher(teacher_net)
    store = tmp / f"replay{case.img_size}{'-mixed' if case.mix else ''}"
    if not store.exists():
        precompute(teacher_net, dataset, store, k=10, mode="replay", epochs=epochs, device=device, progress=False)
    return dataset, StoredTeacher.open(store, dataset, epochs=epochs)


class EpochTimer:
    """The trainer's own epoch (`train_one_epoch`: loading, the replayable views, the teacher or
    store, the step, bookkeeping; no validation) of one `EpochCase` against its bare step
    (`train_step` on a batch already in memory, the teacher's part included). Built once (with its
    warm-up epoch); each `sample()` times one epoch and then `steps` bare steps, so that several
    timers can take their samples in turns. The "light" augmentation of the course's profiles."""

    def __init__(self, case: EpochCase, *, device: torch.device, steps: int, samples: int, tmp: Path) -> None:
        self.case, self.device, self.steps = case, device, steps
        self.epoch_s: list[float] = []
        self.step_s: list[float] = []
        self.dataset, teacher = _epoch_data_and_teacher(
            case, device=device, samples=case.batch * steps, epochs=samples + 1, tmp=tmp
        )
        self.config = TrainConfig(
            epochs=samples + 1,
            batch_size=case.batch,
            warmup_epochs=0,
            alpha=0.0 if case.source is None else 1.0,
            device=str(device),
            amp=False if case.old_path else None,
            channels_last=not case.old_path,
            fused_adamw=not case.old_path,
        )
        torch.manual_seed(0)
        model = build_model(case.model, num_classes=EPOCH_CLASSES, img_size=case.img_size)
        if case.old_path:
            with_small_map_convs(model, undo=True)  # a teacher's convolutions as torchvision ships them
        self.parts = _build(model, self.dataset, self.config, teacher)
        self.state = TrainState()
        self.dataset.set_epoch(0)
        self.batch = next(iter(self.parts.loader))  # (images, labels, ids) for the bare steps
        self._epoch()  # warm-up

    def _epoch(self) -> None:
        train_one_epoch(self.parts, self.state, self.dataset, self.config, progress=False)

    def sample(self) -> None:
        """Time one epoch, then `steps` bare steps."""
        t0 = time.perf_counter()
        self._epoch()
        self.epoch_s.append(time.perf_counter() - t0)
        self.step_s.append(_timed(lambda: train_step(self.parts, *self.batch, 0), self.device, self.steps)[0])

    def row(self, peaks: dict[str, float] | None = None) -> dict:
        """The case's row: medians of the samples taken; with `peaks` (`matmul_peaks`), the epoch's
        FLOP rate (the model's training FLOPs, `flops_per_image`; an online teacher's forward pass
        not counted) and its fraction of the peak of the precision it trains in."""
        case = self.case
        epoch, step = statistics.median(self.epoch_s), statistics.median(self.step_s)
        rate = {}
        if peaks:
            flops = flops_per_image(self.parts.model, "train", case.img_size) * case.batch * self.steps / epoch
            rate = dict(gflops_per_s=flops / 1e9, fraction_of_peak=flops / peaks["bf16" if self.parts.amp else "fp32"])
        return dict(
            case=case.label,
            model=case.model,
            img_size=case.img_size,
            batch=case.batch,
            source=case.source,
            old_path=case.old_path,
            autocast=self.parts.amp,
            images_per_s=case.batch * self.steps / epoch,
            bare_step_images_per_s=case.batch / step,
            epoch_over_steps=epoch / (self.steps * step),
            **rate,
        )


def epoch_rows(
    cases: Sequence[EpochCase],
    *,
    device: torch.device,
    steps: int,
    repeats: int,
    tmp: Path,
    reference: Callable[[], None] | None = None,
    peaks: dict[str, float] | None = None,
) -> list[dict]:
    """The rows of `cases` timed in turns: each round takes one sample of every case (and, with
    `reference`, `steps` steps of another model: timm's, for the goal's ratio, first in every other
    round), so that all of them see the same moments of a machine whose speed drifts. Medians of
    `repeats` rounds."""
    timers = [EpochTimer(case, device=device, steps=steps, samples=repeats, tmp=tmp) for case in cases]
    reference_s = []
    if reference is not None:
        reference()  # its warm-up
    for round_ in range(repeats):
        if reference is not None and round_ % 2:
            reference_s.append(_timed(reference, device, steps)[0])
        for timer in timers:
            timer.sample()
        if reference is not None and not round_ % 2:
            reference_s.append(_timed(reference, device, steps)[0])
    rows = [timer.row(peaks) for timer in timers]
    if reference_s:
        rows[0]["reference_images_per_s"] = cases[0].batch / statistics.median(reference_s)
        # timm's step has two speeds under AVX2 caps (docs/performance.md): the samples' spread shows which
        rows[0]["reference_images_per_s_range"] = (cases[0].batch / max(reference_s), cases[0].batch / min(reference_s))
    return rows


def epoch_section(
    *, device: torch.device, quick: bool, rows: list[dict], timm=None, peaks: dict[str, float] | None = None
) -> dict:
    """Every `EPOCH_CASES` row, printed as measured, and the goals' ratios measured in this run:
    the student's end-to-end rate at 32 over timm's matched bare step in eager fp32, and the
    teacher's over its old path. The two sides of each ratio are timed in turns (the fairest
    pairing on a machine whose speed drifts): timm's step (with `timm`) with the student's epochs,
    the teacher's old path with its new one (`EpochCase.in_turns_with`); `rows`' train32 eager
    row is reported beside the first."""
    print("trainer end to end (synthetic images, light augmentation; epoch = train_one_epoch, no validation)")
    print(
        f"{'case':<26}{'batch':>6}{'epoch img/s':>13}{'bare step':>11}{'epoch/steps':>13}{'GFLOP/s':>9}{'of peak':>9}"
    )
    cases = [replace(c, batch=8) if quick else c for c in EPOCH_CASES if not (quick and c.img_size > 32)]
    labels = {c.label for c in cases}
    followers = {c.label: [f for f in cases if f.in_turns_with == c.label] for c in cases}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case.in_turns_with in labels:
                continue  # timed in turns with the case it follows
            group = [case] + followers[case.label]
            steps = 2 if quick else (8 if case.img_size <= 32 else 4)
            reference = None
            if timm is not None and case.label == "student 32, labels":  # the same head as the student's
                timm_model = contenders(timm, case.img_size, EPOCH_CLASSES)["timm_matched"]()
                eager = POLICIES["eager"]
                reference = make_step(timm_model, "train", eager, case.img_size, case.batch, device, EPOCH_CLASSES)
            repeats = 1 if quick else (7 if reference else 3)
            group_rows = epoch_rows(
                group, device=device, steps=steps, repeats=repeats, tmp=Path(tmp), reference=reference, peaks=peaks
            )
            for row in group_rows:
                results.append(row)
                flop_rate = f"{row['gflops_per_s']:>9.1f}{row['fraction_of_peak']:>9.0%}" if peaks else ""
                print(
                    f"{row['case']:<26}{row['batch']:>6}{row['images_per_s']:>13.1f}"
                    f"{row['bare_step_images_per_s']:>11.1f}{row['epoch_over_steps']:>12.3f}x{flop_rate}"
                    + (" bf16" if row["autocast"] else ""),
                    flush=True,
                )
    return dict(rows=results, **_epoch_ratios({r["case"]: r for r in results}, rows))


def _epoch_ratios(by_case: dict[str, dict], rows: list[dict]) -> dict[str, float]:
    """The goals' ratios from the epoch rows (printed as computed)."""
    out = {}
    student = by_case.get("student 32, labels")
    if student and "reference_images_per_s" in student:
        ratio = student["images_per_s"] / student["reference_images_per_s"]
        slowest, fastest = student["reference_images_per_s_range"]
        out["student32_vs_timm_matched_eager_step"] = ratio
        print(
            f"student end to end at 32 / timm-matched bare step (eager fp32), timed in turns: {ratio:.2f}x "
            f"({student['images_per_s']:.1f} / {student['reference_images_per_s']:.1f}; "
            f"timm's samples {slowest:.1f}-{fastest:.1f})"
        )
    timm_eager = next((r for r in rows if r["section"] == "train32" and r["policy"] == "eager"), None)
    if timm_eager and student:
        ratio = student["images_per_s"] / timm_eager["images_per_s"]["timm_matched"]
        out["student32_vs_train32_row"] = ratio
        print(
            f"the same against the train32 eager row's timm-matched step (a {NUM_CLASSES}-class head), "
            f"timed minutes before: {ratio:.2f}x"
        )
    if "student 32, mixed, store" in by_case and "student 32, mixed, labels" in by_case:
        ratio = (
            by_case["student 32, mixed, labels"]["images_per_s"] / by_case["student 32, mixed, store"]["images_per_s"]
        )
        out["mixed_store_vs_mixed_ce"] = ratio
        print(f"an epoch from a mixed replay store: {ratio:.3f}x the time of cross-entropy with mixing on the fly")
    if "teacher 32" in by_case and "teacher 32, old path" in by_case:
        ratio = by_case["teacher 32"]["images_per_s"] / by_case["teacher 32, old path"]["images_per_s"]
        out["teacher_vs_old_path"] = ratio
        print(f"teacher end to end: {ratio:.2f}x its old path, timed in turns")
    return out


# ----------------------------------------------------------------------------- report

HEADER = (
    f"{'section':<9}{'policy':<14}{'batch':>5}  {'ours':>8}  {'timm-default':>12}  {'timm-matched':>12}"
    f"  {'ours/default':>12}  {'ours/matched':>12}  {'ours GFLOP/s':>12} {'of peak':>7} {'in turns':>8}"
    "   warm-up s (ours/timm)   timm-matched samples"
)


def format_row(row: dict) -> str:
    speed, warmup_s = row["images_per_s"], row["warmup_s"]
    matched = "= default" if "timm_matched" not in warmup_s else f"{speed['timm_matched']:.1f}"
    warmups = "/".join(f"{s:.1f}" for s in warmup_s.values())
    note = f"  ({row['contended_samples']} contended samples retimed)" if row["contended_samples"] else ""
    slowest, fastest = row["timm_matched_images_per_s_range"]
    return (
        f"{row['section']:<9}{row['policy'] + (' bf16' if row['bf16'] else ''):<14}{row['batch']:>5}  "
        f"{speed['ours']:>8.1f}  {speed['timm_default']:>12.1f}  {matched:>12}  "
        f"{row['ours_vs_timm_default']:>11.2f}x  {row['ours_vs_timm_matched']:>11.2f}x  "
        f"{speed['ours'] * row['flops_per_image']['ours'] / 1e9:>12.1f} {row['fraction_of_peak']['ours']:>7.0%}"
        f" {row['fraction_of_peak_in_turns']['ours']:>8.0%}   {warmups:<22}  {slowest:.1f}-{fastest:.1f}{note}"
    )


def ours_vs_timm_eager(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{section: {policy: ratios}}: ours under each other policy over both timm models under eager."""
    eager = {r["section"]: r["images_per_s"] for r in rows if r["policy"] == "eager"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        timm = eager.get(row["section"])
        if timm and row["policy"] != "eager":
            ours = row["images_per_s"]["ours"]
            out.setdefault(row["section"], {})[row["policy"]] = dict(
                vs_timm_default=ours / timm["timm_default"], vs_timm_matched=ours / timm["timm_matched"]
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--sections",
        default=",".join(ALL_SECTIONS),
        help=f"comma-separated, from {', '.join(ALL_SECTIONS)}",
    )
    p.add_argument(
        "--policies", default=",".join(DEFAULT_POLICIES), help=f"comma-separated, from {', '.join(POLICIES)}"
    )
    p.add_argument(
        "--quick", action="store_true", help="batch 4, two warm-up steps and one short timed sample: a smoke run"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per contender (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's allocator at its defaults (model rows; the trainer, so the epoch rows, always set it)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: run as on an AVX2-only CPU (PyTorch's, oneDNN's and MKL's kernels capped at AVX2, no native bf16, "
        "so the fp32 policy), in a fresh process",
    )
    p.add_argument(
        "--store-dir",
        default=None,
        help="store section: write the 0.7 GB store in a temporary folder here, on the disk your stores will "
        "live on (default: the system's temporary folder)",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


# Environment variables that cap each library's kernels at AVX2; read when torch loads.
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def rerun_as_avx2(argv: list[str]) -> int:
    """Run this benchmark again in a process whose kernels are capped at AVX2 (the caps must be set
    before torch loads); returns its exit status. All three libraries need their own cap: PyTorch's
    elementwise kernels, oneDNN's convolutions, and MKL's GEMMs (torch.matmul, nn.Linear), which
    would otherwise keep AVX-512 and double the fp32 peak."""
    return subprocess.call([sys.executable, "-m", "benchmarks.bench", *argv], env=dict(os.environ, **AVX2_CAPS))


def model_sections(
    timm,
    sections: list[str],
    policies: list[str],
    *,
    device,
    warmup: int,
    repeats: int,
    peaks: dict[str, float],
    batch: int | None,
) -> list[dict]:
    """One row per (section, policy): ours against timm, printed as it is measured."""
    sections = [s for s in SECTIONS if s in sections]
    if sections:
        print(
            f"images/s, median of {repeats} timed samples (>= {SAMPLE_S} s each) after {warmup} warm-up steps; "
            "ratios are ours over timm under the same policy; ours' FLOP rate over the run's matmul peak and over "
            "the same matmul timed in turns with the row\n" + HEADER,
            flush=True,
        )
    rows = []
    for section in sections:
        for name in policies:
            rows.append(
                measure(
                    timm,
                    section,
                    POLICIES[name],
                    device=device,
                    warmup=warmup,
                    repeats=repeats,
                    peaks=peaks,
                    batch=batch,
                )
            )
            print(format_row(rows[-1]), flush=True)
    return rows


def further_sections(
    sections: list[str],
    timm,
    *,
    device: torch.device,
    quick: bool,
    warmup: int,
    repeats: int,
    peaks,
    models,
    store_dir: str | None = None,
) -> dict:
    """The sections after the model rows that `sections` names: kernels, distill, epoch, profile, store, onnx."""
    results: dict = {}
    if "kernels" in sections:
        results["kernels"] = kernel_section(device=device, warmup=warmup, repeats=repeats, batch=8 if quick else 128)
    if "distill" in sections:
        results["distill"] = distill_section(
            device=device,
            warmup=warmup,
            repeats=max(repeats, 3),
            batch=16 if quick else 128,
            samples=64 if quick else 4096,
        )
    if "epoch" in sections:
        results["epoch"] = epoch_section(device=device, quick=quick, rows=models, timm=timm, peaks=peaks)
    if "profile" in sections:
        print("where a training step's time goes (the trainer's default policy; operators timed one by one)")
        results["profile"] = profile_section(
            device=device,
            peaks=peaks,
            quick=quick,
            make_step=make_step,
            flops_per_image=flops_per_image,
            default_policy=FAST,
        )
    if "store" in sections:
        with tempfile.TemporaryDirectory(dir=store_dir, prefix="tinyvit-store-bench-") as tmp:
            results["store"] = store_section(Path(tmp), quick=quick)
    if "onnx" in sections:
        print("the exported model: onnxruntime (CPU provider, fp32) beside PyTorch eager, the same batch, in turns")
        onnx_repeats = 1 if quick else max(repeats, 3)
        results["onnx"] = onnx_section(
            quick=quick,
            timer=lambda steps: time_in_turns(steps, warmup=1, repeats=onnx_repeats, device=torch.device("cpu"))[0],
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k, "").upper() != v.upper() for k, v in AVX2_CAPS.items()):
        return rerun_as_avx2(sys.argv[1:] if argv is None else argv)
    sections = [s for s in args.sections.split(",") if s]
    policies = [s for s in args.policies.split(",") if s]
    unknown = sorted(set(sections) - set(ALL_SECTIONS)) + sorted(set(policies) - set(POLICIES))
    if unknown:
        print(f"error: unknown section or policy {unknown}", file=sys.stderr)
        return 2
    try:
        import timm
    except ImportError:
        print("error: make bench compares with timm: pip install timm (it is in the dev extras)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, repeats, batch = (2, 1, 4) if args.quick else (args.warmup, args.repeats, None)
    global SAMPLE_S
    SAMPLE_S = QUICK_SAMPLE_S if args.quick else FULL_SAMPLE_S
    device = pick_device(args.device)
    started = time.perf_counter()
    info = machine()
    info["malloc_keeps_freed_memory"] = False if args.system_malloc else keep_freed_memory()
    print(
        f"machine: {info['cpu']} (kernels {info['isa']}, oneDNN {info['onednn_max_isa']}, MKL {info['mkl_isa']}, "
        f"native bf16 {info['native_bf16']}), {info['cores']} cores, {info['threads']} torch threads, "
        f"torch {info['torch']}, timm {info['timm']}, device {device}, "
        f"glibc keeps freed memory: {info['malloc_keeps_freed_memory']}"
    )
    results: dict = dict(
        machine=info, device=str(device), quick=args.quick, policies={name: asdict(POLICIES[name]) for name in policies}
    )
    peaks = matmul_peaks(device, quick=args.quick)
    results["matmul_peak_gflops"] = {name: round(flops / 1e9, 1) for name, flops in peaks.items()}
    results["models"] = model_sections(
        timm, sections, policies, device=device, warmup=warmup, repeats=repeats, peaks=peaks, batch=batch
    )
    results["ours_vs_timm_eager"] = ours_vs_timm_eager(results["models"])
    for section, by_policy in results["ours_vs_timm_eager"].items():
        for name, ratios in by_policy.items():
            print(
                f"{section:<9}ours {name} / timm eager: {ratios['vs_timm_default']:.2f}x timm-default, "
                f"{ratios['vs_timm_matched']:.2f}x timm-matched"
            )
    results.update(
        further_sections(
            sections,
            timm,
            device=device,
            quick=args.quick,
            warmup=warmup,
            repeats=repeats,
            peaks=peaks,
            models=results["models"],
            store_dir=args.store_dir,
        )
    )
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"total wall time {results['wall_s']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
