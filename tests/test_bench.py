"""`make bench` runs: a smoke run of its quick mode (no timing is asserted) and its refusals."""

import json
import re
import sys

import pytest

from benchmarks.bench import main, matched_window_sizes


def test_quick_bench_writes_every_number(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "bench.json"
    sections = "train32,infer32,kernels,distill,epoch,profile,store,onnx"
    assert main(["--quick", "--sections", sections, "--system-malloc", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {(row["section"], row["policy"]) for row in results["models"]} == {
        (section, policy) for section in ("train32", "infer32") for policy in ("eager", "fast")
    }
    for row in results["models"]:
        assert set(row["images_per_s"]) == {"ours", "timm_default", "timm_matched"}
        assert min(row["images_per_s"].values()) > 0
        assert row["ours_vs_timm_default"] > 0 and row["ours_vs_timm_matched"] > 0
        slowest, fastest = row["timm_matched_images_per_s_range"]  # the samples behind the median
        assert slowest <= row["images_per_s"]["timm_matched"] <= fastest
        # the same computation: the matched windows count ours' FLOPs; timm's default pads at 32
        assert row["flops_per_image"]["ours"] == pytest.approx(row["flops_per_image"]["timm_matched"], rel=0.01)
        assert row["flops_per_image"]["timm_default"] > 2 * row["flops_per_image"]["ours"]
        assert 0 < row["fraction_of_peak"]["ours"] < 1.5  # a quick run's tiny peak matmul is noisy
        assert row["peak_in_turns_gflops"] > 0 and 0 < row["fraction_of_peak_in_turns"]["ours"] < 1.5
    train, infer = (next(r for r in results["models"] if r["section"] == s) for s in ("train32", "infer32"))
    assert train["flops_per_image"]["ours"] == pytest.approx(3 * infer["flops_per_image"]["ours"])  # backward 2x
    assert set(results["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert set(results["ours_vs_timm_eager"]) == {"train32", "infer32"}
    assert results["ours_vs_timm_eager"]["train32"]["fast"]["vs_timm_matched"] > 0
    rules = (
        ["depthwise in fp32"] * 4
        + ["1x1 as a matmul"] * 3
        + ["Winograd F(4x4, 3x3)"] * 2
        + ["small map as a matmul"] * 2
    )
    assert [row["rule"] for row in results["kernels"]] == rules
    assert all(min(row["ms"].values()) > 0 and row["rule_vs_bf16"] > 0 for row in results["kernels"])
    assert all(row["fp32_rule_vs_fp32"] > 0 for row in results["kernels"])
    assert results["distill"]["store_vs_ce"] > 0 and results["distill"]["precompute_images_per_s"] > 0
    epoch_rows = {row["case"]: row for row in results["epoch"]["rows"]}
    assert set(epoch_rows) == {
        "student 32, labels",
        "student 32, store",
        "student 32, online",
        "student 32, mixed, labels",
        "student 32, mixed, store",
        "teacher 32",
        "teacher 32, old path",
    }  # --quick leaves out 224
    assert all(row["images_per_s"] > 0 and row["epoch_over_steps"] > 0 for row in epoch_rows.values())
    assert all(0 < row["fraction_of_peak"] and row["gflops_per_s"] > 0 for row in epoch_rows.values())
    assert results["epoch"]["student32_vs_timm_matched_eager_step"] > 0 and results["epoch"]["teacher_vs_old_path"] > 0
    student = epoch_rows["student 32, labels"]
    assert student["reference_images_per_s"] > 0  # timm's step, timed in the same turns
    slowest, fastest = student["reference_images_per_s_range"]
    assert slowest <= student["reference_images_per_s"] <= fastest
    assert results["epoch"]["student32_vs_train32_row"] > 0
    assert results["epoch"]["mixed_store_vs_mixed_ce"] > 0
    profiles = {(row["model"], row["img_size"]): row for row in results["profile"]}
    assert set(profiles) == {("tinyvit_5m", 32), ("resnet18", 32)}  # --quick leaves out 224
    for row in profiles.values():
        assert row["images_per_s"] > 0 and 0 < row["fraction_of_peak"] and row["gflops_per_s"] > 0
        header, *lines = row["table"].splitlines()
        assert "operator" in header and len(lines) == 12  # which operators lead depends on the machine's moment
        assert all(re.fullmatch(r"\s+[\d.]+\s+\d+%\s+\d+\s+\w+\s+\(.*\)", line) for line in lines), lines
        assert 0.2 < row["operators_share_of_step"] < 5
    store = results["store"]
    assert store["records"] == 132_000 and store["bytes_per_record"] == 52  # k = 10 of 21,841 classes
    for name in ("write_1_processes", "write_2_processes"):
        assert min(store[name].values()) > 0
    for name in ("read_cold", "read_cold_random_advice", "read_warm"):
        assert store[name]["records_per_s"] > 0 and store[name]["batches"] > 0
        assert 0 <= store[name]["resident_before"] <= store[name]["resident_after"] <= 1
    assert store["read_warm"]["resident_before"] >= 0.9  # read once: the file is in the page cache
    assert [(row["img_size"], row["batch"]) for row in results["onnx"]] == [(32, 4)]  # --quick leaves out 224
    for row in results["onnx"]:
        assert row["max_abs_logit_diff"] <= 1e-4 and row["torch_fp32"] > 0 and row["onnxruntime_fp32"] > 0
    assert results["wall_s"] > 0 and results["machine"]["threads"] >= 1


def test_matched_windows_are_the_clipped_ones():
    assert matched_window_sizes(32) == (7, 4, 2, 1)  # maps 8, 4, 2, 1; stage 0's entry is unused
    assert matched_window_sizes(224) == (7, 7, 14, 7)  # timm's default: one model at 224


def test_missing_timm_and_unknown_sections_exit_2(monkeypatch, capsys):
    assert main(["--sections", "train33"]) == 2
    assert "train33" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    assert main(["--sections", "train32"]) == 2
    assert "pip install timm" in capsys.readouterr().err
