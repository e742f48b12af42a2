"""The GPU check refuses in one line where there is no CUDA device (its GPU path needs a GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_without_cuda_it_refuses_in_one_line(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device here" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_it_runs_and_reports(capsys):  # pragma: no cover - only where a GPU is lent
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    stages = ("teacher (resnet18", "replay store", "student (TinyViT-5M", "student, torchrun x2")
    lines = [next(line for line in out.splitlines() if line.startswith(stage)) for stage in stages]
    assert all(" nan images/s" not in line and "images/s" in line for line in lines), out
    # every training run chose the GPU policy: the device, bf16 autocast, channels-last, fused AdamW
    for line in lines[:1] + lines[2:]:
        assert "'device': 'cuda:" in line and "'autocast': 'bfloat16'" in line, line
        assert "'channels_last': True" in line and "'fused_adamw': True" in line, line
