"""bench/vs_trl.py's harness on the tiny model, trainer side only (TRL is a bench extra, not installed in CI).
Checks the figures the README table is built from, not any speed: speed is the benchmark's job."""

import json
import sys

import pytest

from tests.conftest import ALPACA, ROOT, THREADS, clean_env, run_checked

sys.path.insert(0, str(ROOT / "bench"))
import vs_trl  # noqa: E402


@pytest.mark.slow
def test_trainer_run_is_counted_and_reported(tmp_path):
    out = tmp_path / "results"
    run_checked(
        [
            sys.executable,
            ROOT / "bench" / "vs_trl.py",
            "--tiny",
            "--data",
            ALPACA,
            "--rows",
            "40",
            "--tools",
            "trainer",
            "--eval-rows",
            "8",
            "--out",
            out,
        ],
        env=clean_env(cpu_only=False, OMP_NUM_THREADS=str(THREADS)),
    )
    [result_json] = out.glob("vs_trl-*.json")
    [result_md] = out.glob("vs_trl-*.md")
    payload = json.loads(result_json.read_text())
    r = payload["results"]["trainer"]
    assert r["rc"] == 0 and r["steps"] >= 1
    # Every real token of the 40 rows trained once (one epoch), packed (40 rows: the last packed rows are part
    # empty, so the bound is looser than the <5% measured on 200 rows of the real model).
    assert r["real_tokens"] > 40 * 10 and r["target_tokens"] < r["real_tokens"]
    assert 0.0 < r["padding_frac"] < 0.1
    assert len(r["losses"]) == r["steps"] and r["final_loss"] == pytest.approx(r["losses"][-1], rel=1e-4)
    assert r["process_wall_s"] > r["train_s"] > 0 and r["peak_rss_gib"] > 0.1
    assert r["flops_per_token"] > 0 and r["tflops"] == pytest.approx(
        r["flops_per_token"] * r["real_tokens"] / r["train_s"] / 1e12, rel=1e-6
    )
    assert set(payload["heldout"]) == {"base", "trainer"}
    assert payload["heldout"]["trainer"]["heldout_tokens"] == payload["heldout"]["base"]["heldout_tokens"] > 0
    assert "| trainer |" in result_md.read_text()


def test_ratios_are_theirs_over_ours():
    ours = {"rc": 0, "process_wall_s": 100.0, "train_s": 80.0, "real_tokens": 8000, "peak_rss_gib": 1.0}
    theirs = {"rc": 0, "process_wall_s": 250.0, "train_s": 200.0, "real_tokens": 8000, "peak_rss_gib": 2.0}
    rat = vs_trl.ratios({"trainer": ours, "trl-default": theirs})["trl-default"]
    assert rat == {
        "whole_process_speedup": 2.5,
        "training_speedup": 2.5,
        "real_tokens_per_s_ratio": 2.5,
        "peak_rss_ratio": 0.5,
    }


def test_model_flops_of_every_tool_use_trainers_flops_per_token_and_peak():
    ours = {"rc": 0, "train_s": 10.0, "real_tokens": 1000, "flops_per_token": 6e9, "tflops": 0.5, "mfu": 0.25}
    theirs = {"rc": 0, "train_s": 20.0, "real_tokens": 1000}
    results = {"trainer": ours, "trl-packing": theirs}
    vs_trl.add_model_flops(results)
    assert ours["tflops"] == pytest.approx(0.6) and theirs["tflops"] == pytest.approx(0.3)
    assert ours["mfu"] == pytest.approx(0.3) and theirs["mfu"] == pytest.approx(0.15)  # peak: 2 TFLOP/s
