"""The training loop: learning, exact resume after SIGKILL, atomic checkpoints, NaN stops, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from tinyvit_lib import AugmentConfig, TinyViT, TinyViTConfig, get_dataset
from tinyvit_lib.trainer import (
    CosineSchedule,
    TrainConfig,
    evaluate,
    history_table,
    load_checkpoint,
    param_groups,
    pick_device,
    read_log,
    saved_config,
    train,
)
from tinyvit_lib.utils import cpu_has_native_bf16, progress

REPO = Path(__file__).resolve().parent.parent
LIGHT = AugmentConfig(randaugment_ops=0, erase_prob=0.0, scale=(0.5, 1.0))


def tiny_model(num_classes: int = 10) -> TinyViT:
    return TinyViT(
        TinyViTConfig(
            embed_dims=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 3, 4),
            num_classes=num_classes,
            img_size=32,
            drop_path_rate=0.1,
        )
    )


def synthetic(n_train: int = 256, n_val: int = 128, augment=LIGHT):
    return (
        get_dataset("synthetic", split="train", num_samples=n_train, augment=augment),
        get_dataset("synthetic", split="test", num_samples=n_val),
    )


def run_script(body: str, tmp_path: Path, name: str = "script.py", **popen) -> subprocess.Popen:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, **popen)


def test_short_run_learns(tmp_path):
    torch.manual_seed(0)
    train_set, val_set = synthetic(n_train=512)
    model = tiny_model()
    before = evaluate(model, val_set)
    result = train(
        model,
        train_set,
        val_set,
        TrainConfig(epochs=3, batch_size=32, lr=3e-3, warmup_epochs=0.5),
        run_dir=tmp_path / "run",
        progress=False,
    )
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    assert before["top1"] < 30.0 < result.final["top1"]  # 10 classes: chance is 10%
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"} <= set(ckpt)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["train_set"]["name"] == "synthetic"


def test_weight_decay_groups():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 and "attention_biases" not in names[id(p)] for p in decay["params"])
    assert any("attention_biases" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight, torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    schedule = CosineSchedule(optimizer, lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=6)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(7):
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75, 1.0)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, *cosine, 0.1])  # linear warmup, cosine, then held at min_lr
    resumed = CosineSchedule(torch.optim.AdamW([weight], lr=1.0), lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=6)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == lrs[-1] and resumed.step_count == 7


def test_gradients_are_clipped_to_the_configured_norm(monkeypatch, tmp_path):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, norm: calls.append(norm) or clip(params, norm)
    )
    train_set, val_set = synthetic(n_train=32, n_val=16)
    for clip_grad, expected in ((0.25, [0.25]), (0.0, [])):
        calls.clear()
        config = TrainConfig(epochs=1, batch_size=32, clip_grad=clip_grad, amp=False)
        train(tiny_model(), train_set, val_set, config, run_dir=tmp_path / str(clip_grad), progress=False)
        assert calls == expected


TRAIN_SCRIPT = """
    import sys, torch
    sys.path.insert(0, {repo!r})
    from tests.test_trainer import tiny_model, synthetic
    from tinyvit_lib.trainer import TrainConfig, train
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights in every process
    train_set, val_set = synthetic(n_train=512, n_val=32)  # 16 steps an epoch: time to catch a mid-epoch checkpoint
    config = TrainConfig(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, checkpoint_every=2)
    train(tiny_model(), train_set, val_set, config, run_dir={run_dir!r}, resume={resume}, progress=False)
"""


def test_exact_resume_after_sigkill(tmp_path):
    reference = run_script(
        TRAIN_SCRIPT.format(repo=str(REPO), run_dir=str(tmp_path / "ref"), resume=False), tmp_path, "ref.py"
    )
    victim_log = open(tmp_path / "victim.err", "w")  # noqa: SIM115 - closed below, after the kill
    victim = run_script(
        TRAIN_SCRIPT.format(repo=str(REPO), run_dir=str(tmp_path / "run"), resume=False),
        tmp_path,
        "run.py",
        stderr=victim_log,
    )
    last = tmp_path / "run" / "last.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        if last.exists():
            ckpt = load_checkpoint(last)
            if ckpt["epoch"] == 1 and ckpt["batch"] > 0:  # mid-way through the second epoch
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed_at = (ckpt["epoch"], ckpt["batch"])
                break
        time.sleep(0.01)
    victim_log.close()
    why = f"exit {victim.poll()}: {(tmp_path / 'victim.err').read_text()[-2000:]}"
    assert killed_at is not None, f"the run finished or stalled before a mid-epoch checkpoint appeared ({why})"
    resumed = run_script(
        TRAIN_SCRIPT.format(repo=str(REPO), run_dir=str(tmp_path / "run"), resume=True), tmp_path, "resume.py"
    )
    assert resumed.wait(timeout=300) == 0 and reference.wait(timeout=300) == 0
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(tmp_path / "run" / "last.pt")
    assert a["step"] == b["step"] == 2 * 16
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in read_log(tmp_path / "ref")] == [
        r["train_loss"] for r in read_log(tmp_path / "run")
    ]


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    writer = run_script(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tinyvit_lib.utils import save_checkpoint
        i = 0
        while True:
            save_checkpoint(dict(i=i, weights=torch.full((1_000_000,), float(i))), {str(path)!r})
            i += 1
    """,
        tmp_path,
    )
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # several saves in, then kill at an arbitrary point of one
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["weights"], torch.full((1_000_000,), float(ckpt["i"])))


class NaNAfter(torch.nn.Module):
    """A classifier that starts returning NaN after `calls` training forwards."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.net = tiny_model()
        self.calls = calls

    def forward(self, x):
        if self.training:
            self.calls -= 1
        out = self.net(x)
        return out * float("nan") if self.calls < 0 else out


def test_a_fresh_run_in_a_used_folder_keeps_none_of_the_old_runs_checkpoints(tmp_path):
    train_set, val_set = synthetic(n_train=64, n_val=32)
    config = TrainConfig(epochs=1, batch_size=32)
    train(tiny_model(), train_set, val_set, config, run_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.pt").is_file()
    with pytest.raises(FloatingPointError, match="no checkpoint was saved yet"):  # true: the old ones are gone
        train(NaNAfter(calls=0), train_set, val_set, config, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    train_set, val_set = synthetic(n_train=128, n_val=32)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 6 \(epoch 2, batch 2\)"):
        train(
            NaNAfter(calls=6),
            train_set,
            val_set,
            TrainConfig(epochs=3, batch_size=32),
            run_dir=tmp_path / "run",
            progress=False,
        )
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_without_a_teacher_alpha_is_not_used(tmp_path):
    # alpha weighs the teacher's term; a run without a teacher trains on labels alone, bit for bit.
    train_set, val_set = synthetic(n_train=64, n_val=32)
    weights = []
    for alpha in (0.0, 0.5):
        config = TrainConfig(epochs=1, batch_size=32, alpha=alpha, amp=False)
        torch.manual_seed(0)
        train(tiny_model(), train_set, val_set, config, run_dir=tmp_path / f"a{alpha}", progress=False)
        weights.append(load_checkpoint(tmp_path / f"a{alpha}" / "last.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_config_values():
    with pytest.raises(ValueError, match="epochs=-1"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="alpha=1.5"):
        TrainConfig(alpha=1.5)


DDP_SCRIPT = """
    import json, os, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.test_trainer import tiny_model, synthetic
    from tinyvit_lib.trainer import TrainConfig, train
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_set, val_set = synthetic(n_train=512, n_val=128)
    world = int(os.environ.get("WORLD_SIZE", 1))
    config = TrainConfig(epochs=3, batch_size=64 // world, lr=1e-2, warmup_epochs=0.5)  # learns: about 89% alone
    result = train(tiny_model(), train_set, val_set, config, run_dir={run_dir!r}, progress=False)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT", json.dumps(result.final))
"""


DDP_NAN_SCRIPT = """
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.test_trainer import NaNAfter, synthetic
    from tinyvit_lib.trainer import TrainConfig, train
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_set, val_set = synthetic(n_train=256, n_val=32)
    calls = {calls} if os.environ["RANK"] == "1" else 10**6  # only the second process's loss may turn NaN
    try:
        config = TrainConfig(epochs=2, batch_size=32, checkpoint_every=2)
        train(NaNAfter(calls), train_set, val_set, config, run_dir={run_dir!r}, resume={resume}, progress=False)
    except FloatingPointError as error:  # each process its own file: printed lines could interleave
        with open({tmp!r} + "/stopped-" + os.environ["RANK"], "w") as f:
            f.write(str(error))
"""


def launch_ddp(tmp_path: Path, name: str, port: int, **fields) -> subprocess.Popen:
    """Two CPU processes through torchrun running DDP_NAN_SCRIPT with `fields`."""
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(DDP_NAN_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path), **fields)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(cmd + [str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    """Wait for a launched run (a hang times out); its output's tail, for assertion messages."""
    try:
        out, err = process.communicate(timeout=240)
    finally:
        process.kill()  # a no-op for a finished process; none outlives a failed assertion
    return out[-2000:] + err[-2000:]


def test_a_nan_in_one_ddp_process_stops_them_all_and_the_resume_is_exact(tmp_path):
    port = 30800 + os.getpid() % 1000  # apart from the other DDP tests
    out = finish(launch_ddp(tmp_path, "nan", port, calls=3, run_dir=str(tmp_path / "run"), resume=False))
    stopped = {path.name: path.read_text() for path in tmp_path.glob("stopped-*")}
    assert sorted(stopped) == ["stopped-0", "stopped-1"], out
    assert all(
        m.startswith("loss is nan at step 3 (epoch 1, batch 3); the last good checkpoint is") for m in stopped.values()
    )
    # last.pt, saved after step 2 of 4 in the epoch, holds the epoch so far over both processes, and
    # each process's RNG: they were seeded apart (seed + rank), so their DropPath masks differ
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["step"], ckpt["batch"], ckpt["partial_seen"], ckpt["world_size"]) == (2, 2, 2 * 32 * 2, 2)
    by_rank = [rng["torch"] for rng in ckpt["rng_by_rank"]]
    assert torch.equal(by_rank[0], ckpt["rng"]["torch"]) and not torch.equal(by_rank[0], by_rank[1])
    # Resumed from there without the NaN, the run ends as one never stopped: bit for bit.
    [p.unlink() for p in tmp_path.glob("stopped-*")]
    resumed = launch_ddp(tmp_path, "resume", port + 1, calls=10**6, run_dir=str(tmp_path / "run"), resume=True)
    reference = launch_ddp(tmp_path, "ref", port + 2, calls=10**6, run_dir=str(tmp_path / "ref"), resume=False)
    outs = [finish(resumed), finish(reference)]
    assert not list(tmp_path.glob("stopped-*")), outs
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("ref", "run"))
    assert a["step"] == b["step"] == 8, outs
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in read_log(tmp_path / "ref")] == [
        r["train_loss"] for r in read_log(tmp_path / "run")
    ]


DDP_FULL_DISK_SCRIPT = """
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    import tinyvit_lib.trainer as trainer
    from tests.test_trainer import synthetic, tiny_model
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_set, val_set = synthetic(n_train=256, n_val=32)
    writes = iter(range(10**6))
    save = trainer.save_checkpoint

    def full_disk(*args):  # the main process's second write fails, as on a full disk
        if next(writes) == 1:
            raise OSError(28, "No space left on device")
        save(*args)

    trainer.save_checkpoint = full_disk
    try:
        config = trainer.TrainConfig(epochs=2, batch_size=32, checkpoint_every=2)
        trainer.train(tiny_model(), train_set, val_set, config, run_dir={run_dir!r}, progress=False)
    except OSError as error:
        with open({tmp!r} + "/stopped-" + os.environ["RANK"], "w") as f:
            f.write(str(error))
"""


def test_a_checkpoint_the_main_process_cannot_write_stops_every_process(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(
        textwrap.dedent(DDP_FULL_DISK_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path), run_dir=str(tmp_path / "run")))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(31800 + os.getpid() % 1000), str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)  # a hang would time out
    stopped = {path.name: path.read_text() for path in tmp_path.glob("stopped-*")}
    assert sorted(stopped) == ["stopped-0", "stopped-1"], out.stdout[-2000:] + out.stderr[-2000:]
    assert "No space left on device" in stopped["stopped-0"]
    # the second write is the first epoch's end; the first, at step 2, stays the last good checkpoint
    assert stopped["stopped-1"].startswith("the main process could not write best.pt, last.pt in ")
    assert stopped["stopped-1"].endswith("the last good checkpoint is " + str(tmp_path / "run" / "last.pt"))


def test_two_process_ddp_matches_one_process(tmp_path):
    def launch(world: int) -> subprocess.Popen:
        script = tmp_path / f"ddp{world}.py"
        script.write_text(textwrap.dedent(DDP_SCRIPT.format(repo=str(REPO), run_dir=str(tmp_path / f"w{world}"))))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(29500 + os.getpid() % 1000 + world),
            str(script),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(process: subprocess.Popen) -> dict:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
        return json.loads(line.split(" ", 1)[1])

    # The two runs start together: most of a run is starting Python and importing torch.
    processes = [launch(1), launch(2)]
    try:
        one, two = (result(p) for p in processes)
    finally:
        for p in processes:
            p.kill()  # a no-op for a finished process; none outlives a failed assertion
    assert two["step"] == one["step"] == 3 * (512 // 64)
    # Same global batch and schedule; only BatchNorm statistics (per process) and the data split differ.
    assert abs(two["val_loss"] - one["val_loss"]) < 0.25 * one["val_loss"] + 0.05
    assert one["top1"] > 60 and two["top1"] > 60 and abs(two["top1"] - one["top1"]) < 15  # both learned, alike
    # The validation of a DDP run measured the model its checkpoint holds (rank 0's statistics), not a mix
    model = tiny_model()
    model.load_state_dict(load_checkpoint(tmp_path / "w2" / "last.pt")["model"])
    alone = evaluate(model, synthetic(n_train=512, n_val=128)[1])
    assert alone["top1"] == two["top1"] and abs(alone["loss"] - two["val_loss"]) < 1e-4


def test_float16_autocast_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    train_set, val_set = synthetic(n_train=64, n_val=32)
    config = TrainConfig(epochs=1, batch_size=32, amp=True, amp_dtype="float16")
    train(tiny_model(), train_set, val_set, config, run_dir=tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]  # an enabled scaler has state
    with pytest.raises(ValueError, match="amp_dtype=float8"):
        TrainConfig(amp_dtype="float8")


def test_the_speed_policy_is_channels_last_and_fused_adamw_and_is_recorded(tmp_path):
    train_set, _ = synthetic(n_train=64)
    for name, changes in (("fast", {}), ("eager", dict(channels_last=False, fused_adamw=False))):
        model = tiny_model()
        train(
            model,
            train_set,
            None,
            TrainConfig(epochs=1, batch_size=32, **changes),
            run_dir=tmp_path / name,
            progress=False,
        )
        policy = json.loads((tmp_path / name / "config.json").read_text())["policy"]
        conv = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        fast = name == "fast"
        assert policy["channels_last"] is fast and policy["fused_adamw"] is fast
        assert policy["autocast"] == ("bfloat16" if cpu_has_native_bf16() else None)  # either way
        assert conv.is_contiguous(memory_format=torch.channels_last) is fast and conv.is_contiguous() is not fast


@pytest.mark.parametrize("native, img_size, expected", [(True, 224, True), (True, 32, True), (False, 32, False)])
def test_cpu_autocast_by_default_only_where_bf16_is_native(monkeypatch, native, img_size, expected):
    # On an AVX2-only CPU bf16 is emulated (7-10x slower): the default must never pick it there.
    import tinyvit_lib.utils as utils
    from tinyvit_lib.trainer import _build, _policy

    monkeypatch.setattr(utils.torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native}, raising=False)
    monkeypatch.setattr(utils.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # not an emulated AVX2
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    train_set = get_dataset("synthetic", split="train", num_samples=8, img_size=img_size, augment=LIGHT)
    parts = _build(tiny_model(), train_set, TrainConfig(epochs=1, batch_size=4, device="cpu"), None)
    assert parts.amp is expected
    policy = _policy(parts, TrainConfig())
    assert policy["autocast"] == ("bfloat16" if expected else None) and policy["native_bf16"] is native
    assert policy["evaluation"].endswith(", autocast") is native  # training and inference alike
    forced = _build(tiny_model(), train_set, TrainConfig(epochs=1, batch_size=4, device="cpu", amp=False), None)
    assert forced.amp is False


def test_evaluate_runs_a_folded_copy_and_leaves_the_model_training(tmp_path):
    model = tiny_model().train()
    _, val_set = synthetic(n_val=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = evaluate(model, val_set, batch_size=32, amp=False)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.stack([val_set[i][0] for i in range(64)]))])
    labels = torch.tensor([val_set[i][1] for i in range(64)])
    assert metrics["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    in_top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1)
    assert metrics["top5"] == pytest.approx(100 * in_top5.float().mean().item()) and metrics["top5"] > metrics["top1"]
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-4)


def test_compile_cache_is_a_lasting_folder_unless_set(monkeypatch, tmp_path):
    from tinyvit_lib.trainer import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / ".cache" / "tinyvit_lib" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_an_emulated_avx2_cpu_is_not_taken_for_one_with_native_bf16(monkeypatch):
    # How an AVX-512 machine stands in for an AVX2-only laptop: either cap turns the bf16 policy off.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    script = "from tinyvit_lib.utils import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_eval_every_validates_on_its_epochs_and_the_last_and_keeps_best_among_them(tmp_path):
    train_set, val_set = synthetic(n_train=64, n_val=32)
    config = TrainConfig(epochs=5, batch_size=32, eval_every=2, amp=False)
    result = train(tiny_model(), train_set, val_set, config, run_dir=tmp_path / "run", progress=False)
    assert ["top1" in r for r in result.history] == [False, True, False, True, True]  # epochs 2, 4 and the last
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    validated = [r for r in result.history if "top1" in r]
    assert best["history"][-1]["top1"] == max(r["top1"] for r in validated)  # an unvalidated epoch is never best
    with pytest.raises(ValueError, match="eval_every=0"):
        TrainConfig(eval_every=0)


def test_a_run_saved_before_a_config_field_existed_reads_as_its_default():
    saved = {k: v for k, v in asdict(TrainConfig(epochs=3)).items() if k != "eval_every"}
    assert saved_config(saved) == asdict(TrainConfig(epochs=3))
    assert saved_config({}) == {}  # no config at all stays no config (not a run's checkpoint)


def test_history_table_shows_each_epoch_as_a_line_and_marks_missing_fields():
    table = history_table([dict(epoch=1, train_loss=1.0), dict(epoch=2, train_loss=0.5, top1=50.0)])
    assert table.splitlines() == [
        "epoch  train loss  val top-1 %",
        "    1       1.000            -",
        "    2       0.500        50.00",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_keeps_a_freed_block_in_the_heap():
    # A fresh process: a 64 MB block must come from the heap (not a mapping of its own) and stay
    # there when freed, so that the next step reuses its pages instead of faulting in new ones.
    code = textwrap.dedent(
        """
        import ctypes, ctypes.util
        from tinyvit_lib.utils import keep_freed_memory
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        assert keep_freed_memory()
        size, before = 64 * 2**20, libc.sbrk(0)
        block = libc.malloc(size)
        grown = libc.sbrk(0)
        ctypes.memset(block, 1, size)
        libc.free(block)
        print(grown - before > size // 2, libc.sbrk(0) == grown)  # from the heap; the heap not trimmed
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_tqdm_disable_turns_every_bar_off(monkeypatch):
    """make run-all sets TQDM_DISABLE=1, which tqdm's notebook bar would not read by itself."""
    items = [1, 2]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress(items, total=2, desc="x") is items
    monkeypatch.setenv("TQDM_DISABLE", "0")
    bar = progress(items, total=2, desc="x")
    assert bar is not items and list(bar) == items
    assert progress(items, total=2, desc="x", enabled=False) is items


def test_resume_ignores_alpha_without_a_teacher_and_refuses_another_process_count(tmp_path):
    """alpha and temperature play no part in a labels-only run (as `experiment.run_differences` says),
    so a resume may state them otherwise; the batch is per process, so a resume needs as many."""
    train_set, val_set = synthetic(64, 32)
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0.0, seed=0, alpha=0.5)
    run_dir = tmp_path / "run"
    train(tiny_model(), train_set, val_set, config, run_dir=run_dir, progress=False)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["world_size"] == 1 and ckpt["distills"] is False
    more = TrainConfig(**{**asdict(config), "alpha": 1.0, "temperature": 4.0})
    with pytest.raises(ValueError, match=r"config differs in \['epochs'\]"):  # what the run is still counts
        train(tiny_model(), train_set, val_set, replace(more, epochs=2), run_dir=run_dir, resume=True, progress=False)
    result = train(tiny_model(), train_set, val_set, more, run_dir=run_dir, resume=True, progress=False)
    assert len(result.history) == 1  # finished already: nothing more to train
    torch.save(dict(ckpt, world_size=2), run_dir / "last.pt")
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\), this run has 1"):
        train(tiny_model(), train_set, val_set, more, run_dir=run_dir, resume=True, progress=False)


def test_pick_device_gives_each_torchrun_process_its_gpu(monkeypatch):
    assert pick_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # four processes on two GPUs: the fourth shares the second
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # an index asked for is kept
