"""`trainer compare` over run folders written here by hand (config.yaml, run_summary.json, metrics.csv,
eval/report.json): every column from the right file, the table, the CSV, and the overlaid plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from trainer.compare import compare_runs, describe_lora, markdown_table, run_row
from trainer.errors import UserError
from trainer.tracking import CSV_FIELDS


def write_run(folder: Path, lora, summary: dict, rows: list[dict], report: dict | None = None, **config) -> Path:
    folder.mkdir(parents=True)
    cfg = {"model": {"name_or_path": "/models/SmolLM2-135M-Instruct"}, "lora": lora, "train": {}, **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "run_summary.json").write_text(json.dumps(summary))
    with (folder / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    if report is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "report.json").write_text(json.dumps(report))
    return folder


def curve(eval_ppl: list[float], loss: list[float]) -> list[dict]:
    rows = []
    for step, value in enumerate(loss, 1):
        rows.append({"step": step, "loss": value, "token_accuracy": 0.5, "lr": 1e-3})
        if step % 2 == 0:
            ppl = eval_ppl[step // 2 - 1]
            rows.append(
                {
                    "step": step,
                    "eval_loss": round(math.log(ppl), 6),
                    "eval_ppl": ppl,
                    "eval_token_accuracy": 0.25 * step,
                }
            )
    return rows


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    lora = {"r": 4, "alpha": 32.0, "target_modules": "all-linear", "use_dora": False, "init": "default"}
    summary = {
        "steps": 4,
        "train_wall_s": 10.0,
        "tokens_seen": 5000,
        "peak_mem_gib": 1.5,
        "trainable_params": 1000,
        "total_params": 100_000,
        "trainable_share": 1.0,
        "adapter_bytes": 4 * 2**20,
        "model_bytes": None,
        "preempted": False,
        "final_loss": 9.9,
    }
    a = write_run(
        tmp_path / "sweep" / "lora.r=4",
        lora,
        summary,
        curve([8.0, 2.0], [2.0, 1.5, 1.0, 0.5]),
        {"base": {"exact_match": 0.011}, "tuned": {"exact_match": 0.978}},
    )
    full = {
        **summary,
        "trainable_params": 100_000,
        "trainable_share": 100.0,
        "adapter_bytes": None,
        "model_bytes": 400 * 2**20,
        "train_wall_s": 20.0,
        "peak_mem_gib": 3.25,
    }
    b = write_run(tmp_path / "sweep" / "lora=null", None, full, curve([5.0, 1.5], [2.1, 1.2, 0.6, 0.2]))
    stopped = {**summary, "steps": 2, "preempted": True}
    c = write_run(
        tmp_path / "other" / "qdora",
        {**lora, "use_dora": True, "use_rslora": True, "init": "loftq"},
        stopped,
        curve([6.0], [2.0, 1.7]),
        model={"name_or_path": "m", "quantization": "nf4"},
        train={"loraplus_lr_ratio": 16},
    )
    return [a, b, c]


def test_rows_take_every_column_from_the_right_file(runs):
    a, b, c = (run_row(r) for r in runs)
    assert (a["run"], a["model"], a["method"], a["lora"]) == (
        "lora.r=4",
        "SmolLM2-135M-Instruct",
        "LoRA",
        "r=4 alpha=32 all-linear",
    )
    assert (a["trainable_params"], a["trainable_share"], a["weights_bytes"]) == (1000, 1.0, 4 * 2**20)
    assert (a["steps"], a["train_time_s"], a["tokens_per_s"], a["peak_mem_gib"]) == (4, 10.0, 500.0, 1.5)
    # final losses from metrics.csv (the last logged values), not the summary's final_loss
    assert (a["final_train_loss"], a["final_eval_ppl"], a["eval_token_accuracy"]) == (0.5, 2.0, 1.0)
    assert a["final_eval_loss"] == pytest.approx(0.693147)
    assert (a["exact_match"], a["exact_match_base"], a["finished"]) == (0.978, 0.011, True)
    assert (b["method"], b["lora"], b["weights_bytes"], b["exact_match"]) == ("full", "-", 400 * 2**20, None)
    assert (c["method"], c["lora"], c["finished"]) == (
        "QLoRA",
        "r=4 alpha=32 all-linear DoRA rsLoRA init=loftq LoRA+ x16",
        False,
    )


def test_compare_writes_table_csv_and_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    rows = compare_runs(runs, out, log=lambda m: None)
    assert [r["run"] for r in rows] == ["lora.r=4", "lora=null", "qdora"]
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert table[0].startswith(
        "| run | model | method | LoRA settings | trainable params | trainable share | "
        "adapter on disk | steps | train time | tokens/s | peak memory | final train loss |"
    )
    assert table[1] == (
        "| lora.r=4 | SmolLM2-135M-Instruct | LoRA | r=4 alpha=32 all-linear | 1.00k | 1.00% | "
        "4.0 MiB | 4 | 10.0 s | 500 | 1.50 GiB | 0.5000 | 0.6931 | 2.000 | 1.000 | 0.978 |"
    )
    assert table[2].split(" | ")[4:7] == ["100.00k", "100.00%", "400.0 MiB (full model)"]
    assert "Not finished (stopped or preempted): qdora." in md and "![eval perplexity](eval_ppl.png)" in md
    with (out / "compare.csv").open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["weights_bytes"] == str(4 * 2**20) and got[0]["trainable_share"] == "1.0"
    assert got[1]["exact_match"] == "" and got[0]["exact_match_base"] == "0.011"
    for png in ("eval_ppl.png", "train_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_overlaid_plot_is_readable(runs):
    """Shared axes with one labelled line per run, a title, axis labels, integer step ticks, log y when the
    perplexities span a wide range."""
    from matplotlib.ticker import MaxNLocator

    from trainer.plots import runs_figure, series

    rows = [run_row(r) for r in runs]
    fig = runs_figure(
        {r["run"]: series(r["_metrics"], "eval_ppl") for r in rows},
        title="Eval perplexity",
        ylabel="eval perplexity",
        log_ratio=3.0,
    )
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lora.r=4", "lora=null", "qdora"]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[2, 4], [2, 4], [2]]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "eval perplexity (log scale)"  # 8.0 / 1.5 > 3
    assert ax.get_xlabel() == "optimizer step" and ax.get_title() == "Eval perplexity"
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    flat = runs_figure({"a": [(1, 2.0), (2, 1.9)]}, title="t", ylabel="y")
    assert flat.axes[0].get_yscale() == "linear"


def test_same_folder_names_are_told_apart_and_bad_input_is_one_line(tmp_path, runs):
    twin = write_run(tmp_path / "again" / "lora.r=4", None, {}, [])
    rows = compare_runs([runs[0], twin], tmp_path / "o", log=lambda m: None)
    assert [r["run"] for r in rows] == ["sweep/lora.r=4", "again/lora.r=4"]
    assert rows[1]["final_train_loss"] is None and rows[1]["steps"] is None
    with pytest.raises(UserError, match="no such folder"):
        compare_runs([tmp_path / "missing"], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        compare_runs([tmp_path / "empty"], tmp_path / "o")


def test_markdown_table_escapes_pipes():
    row = {"run": "a|b", "method": "LoRA", "lora": "r=4"}
    assert "| a/b |" in markdown_table([row])
    assert describe_lora({"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}) == (
        "LoRA",
        "r=8 alpha=16 q_proj+v_proj",
    )
