"""`make bench` runs: a smoke run of its quick mode (no timing is asserted) and its refusals."""

import json
import sys

import pytest

from tinyvit_lib.bench import main, matched_window_sizes


def test_quick_bench_writes_every_number(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "bench.json"
    # --system-malloc: the allocator setting would outlive the test in this process.
    assert main(["--quick", "--sections", "train32,infer32,distill", "--system-malloc", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {(row["section"], row["policy"]) for row in results["models"]} == {
        (section, policy) for section in ("train32", "infer32") for policy in ("eager", "fast")
    }
    for row in results["models"]:
        assert set(row["images_per_s"]) == {"ours", "timm_default", "timm_matched"}
        assert min(row["images_per_s"].values()) > 0
        assert row["ours_vs_timm_default"] > 0 and row["ours_vs_timm_matched"] > 0
    assert set(results["ours_vs_timm_eager"]) == {"train32", "infer32"}
    assert results["ours_vs_timm_eager"]["train32"]["fast"]["vs_timm_matched"] > 0
    assert results["distill"]["store_vs_ce"] > 0 and results["distill"]["precompute_images_per_s"] > 0
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
