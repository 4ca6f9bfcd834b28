"""`trainer compare RUN_DIR... [--out DIR]`: one table and one set of plots over any finished (or stopped) runs.

    OUT/compare.md      the table (markdown) with the plots linked
    OUT/compare.csv     the same columns, raw numbers (bytes, seconds, shares as fractions)
    OUT/eval_ppl.png    eval perplexity vs step, every run overlaid on shared axes
    OUT/train_loss.png  train loss vs step, every run overlaid

Everything is read from the run folders (config.yaml, run_summary.json, metrics.csv, eval/report.json); nothing is
loaded or recomputed. Final losses come from metrics.csv's last rows (a run resumed after its last step has no
final loss in its summary), the rest from run_summary.json; exact match from `trainer eval --exact-match`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from trainer.errors import UserError
from trainer.run_dir import RunDir, claim_folder

COLUMNS = [
    ("run", "run"),
    ("model", "model"),
    ("method", "method"),
    ("lora", "LoRA settings"),
    ("trainable_params", "trainable params"),
    ("trainable_share", "trainable share"),
    ("weights_bytes", "adapter on disk"),
    ("steps", "steps"),
    ("train_time_s", "train time"),
    ("tokens_per_s", "tokens/s"),
    ("peak_mem_gib", "peak memory"),
    ("final_train_loss", "final train loss"),
    ("final_eval_loss", "final eval loss"),
    ("final_eval_ppl", "final eval ppl"),
    ("eval_token_accuracy", "eval token accuracy"),
    ("exact_match", "exact match"),
]
"""(key in a row / compare.csv header, markdown header), in table order."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _last(metrics: list[dict], column: str) -> float | None:
    for row in reversed(metrics):
        text = row.get(column)
        if text not in (None, ""):
            value = float(text)
            return value if math.isfinite(value) else None
    return None


def describe_lora(config: dict) -> tuple[str, str]:
    """(method, LoRA settings) of a run's config.yaml: `full` / `LoRA` / `QLoRA`, and r, alpha, targets and variants."""
    lora = config.get("lora")
    train = config.get("train") or {}
    if lora is None:
        return "full", "-"
    method = "QLoRA" if (config.get("model") or {}).get("quantization") == "nf4" else "LoRA"
    targets = lora.get("target_modules", "all-linear")
    targets = targets if isinstance(targets, str) else "+".join(targets)
    parts = [f"r={lora.get('r')}", f"alpha={lora.get('alpha'):g}", targets]
    if lora.get("use_dora"):
        parts.append("DoRA")
    if lora.get("use_rslora"):
        parts.append("rsLoRA")
    if lora.get("init", "default") != "default":
        parts.append(f"init={lora['init']}")
    if lora.get("modules_to_save"):
        parts.append("save=" + "+".join(lora["modules_to_save"]))
    if train.get("loraplus_lr_ratio"):
        parts.append(f"LoRA+ x{train['loraplus_lr_ratio']:g}")
    return method, " ".join(parts)


def run_row(run_dir: str | Path, label: str | None = None) -> dict:
    """The comparison row of one run folder (numbers raw; None where the run does not have it)."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise UserError(f"{run.root}: not a run folder (no config.yaml); pass output_dir folders of `trainer train`")
    config = yaml.safe_load(run.config.read_text()) or {}
    summary = _read_json(run.summary)
    metrics = _metrics(run)
    report = _read_json(run.eval_report)
    method, lora = describe_lora(config)
    wall = summary.get("train_wall_s")
    tokens = summary.get("tokens_seen")
    steps = summary.get("steps")
    if steps is None and metrics:
        steps = max(int(r["step"]) for r in metrics)
    weights = summary.get("adapter_bytes") if config.get("lora") is not None else summary.get("model_bytes")
    eval_acc = _last(metrics, "eval_token_accuracy")
    return {
        "run": label or run.root.name,
        "path": str(run.root),
        "model": Path(str((config.get("model") or {}).get("name_or_path", "?"))).name,
        "method": method,
        "lora": lora,
        "trainable_params": summary.get("trainable_params"),
        "trainable_share": _share(summary),
        "weights_bytes": weights,
        "steps": steps,
        "train_time_s": wall,
        "tokens_per_s": tokens / wall if tokens and wall else None,
        "peak_mem_gib": summary.get("peak_mem_gib"),
        "final_train_loss": _last(metrics, "loss") if metrics else summary.get("final_loss"),
        "final_eval_loss": _last(metrics, "eval_loss") if metrics else summary.get("final_eval_loss"),
        "final_eval_ppl": _last(metrics, "eval_ppl") if metrics else summary.get("final_eval_ppl"),
        "eval_token_accuracy": eval_acc if eval_acc is not None else summary.get("final_eval_token_accuracy"),
        "exact_match": (report.get("tuned") or {}).get("exact_match"),
        "exact_match_base": (report.get("base") or {}).get("exact_match"),
        "finished": bool(summary) and not summary.get("preempted"),
        "_metrics": metrics,
    }


def _share(summary: dict) -> float | None:
    """Percent of parameters trained, from the summary's counts through the one definition (arch.trainable_share)."""
    from trainer.arch import trainable_share

    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    return trainable_share(trainable, total) if trainable is not None and total else summary.get("trainable_share")


def _metrics(run: RunDir) -> list[dict]:
    from trainer.tracking import read_metrics

    return read_metrics(run.metrics) if run.metrics.is_file() else []


def _labels(run_dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share one, parent/name (then the whole path)."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    names = ["/".join(Path(d).resolve().parts[-2:]) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


# ----------------------------------------------------------------------------------------------- formatting
def _count(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "trainable_params":
        return _count(value)
    if key == "trainable_share":  # percent, as run_summary.json and `trainer estimate` give it
        return "-" if value is None else f"{value:.2f}%"
    if key == "weights_bytes":
        text = _bytes(value)
        return f"{text} (full model)" if value is not None and row["method"] == "full" else text
    if key == "train_time_s":
        return "-" if value is None else f"{value:.1f} s"
    if key == "tokens_per_s":
        return _num(value, ".0f")
    if key == "peak_mem_gib":
        return "-" if value is None else f"{value:.2f} GiB"
    if key in ("final_train_loss", "final_eval_loss"):
        return _num(value, ".4f")
    if key == "final_eval_ppl":
        return _num(value, ".3f")
    if key in ("eval_token_accuracy", "exact_match"):
        return _num(value, ".3f")
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table, one run per row, in COLUMNS order."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k).replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """compare.csv: COLUMNS keys as the header (plus exact_match_base and path), raw values (trainable_share in
    percent, bytes, seconds), empty for missing."""
    keys = [k for k, _ in COLUMNS] + ["exact_match_base", "path"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})


# ----------------------------------------------------------------------------------------------- the command
def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, log=print) -> list[dict]:
    """`trainer compare`: rows for every run, written as OUT/compare.{md,csv} and the overlaid plots
    (OUT defaults to `compare/` beside the first run). Returns the rows (without their metrics)."""
    from trainer.plots import plot_runs, series

    if not run_dirs:
        raise UserError("trainer compare needs at least one RUN_DIR")
    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        if not d.is_dir():
            raise UserError(f"{d}: no such folder; pass output_dir folders of `trainer train` runs")
    rows = [run_row(d, label) for d, label in zip(run_dirs, _labels(run_dirs))]
    out = Path(out) if out is not None else run_dirs[0].parent / "compare"
    claim_folder(out, ".trainer-compare", "a comparison", "Give --out a new or empty folder")
    title = f"{len(rows)} run(s)" + (f" in {run_dirs[0].parent.name}" if len({d.parent for d in run_dirs}) == 1 else "")
    plot_runs(
        {r["run"]: series(r["_metrics"], "eval_ppl") for r in rows},
        out / "eval_ppl.png",
        title=f"Eval perplexity vs step: {title}",
        ylabel="eval perplexity",
        log_ratio=3.0,
    )
    plot_runs(
        {r["run"]: series(r["_metrics"], "loss") for r in rows},
        out / "train_loss.png",
        title=f"Train loss vs step: {title}",
        ylabel="train loss (mean over target tokens)",
    )
    for r in rows:
        r.pop("_metrics")
    write_csv(rows, out / "compare.csv")
    unfinished = [r["run"] for r in rows if not r["finished"]]
    text = [
        f"# Comparison: {title}",
        "",
        markdown_table(rows),
        "",
        "Trainable share: of all parameters. Adapter on disk: the adapter's safetensors (a full fine-tune: the whole "
        "model's). Train time: optimizer steps only, all sessions of a resumed run. Tokens/s: real (unpadded) tokens "
        "over that time. Peak memory: CUDA memory allocated on a GPU, peak resident memory of the process on CPU. "
        "Final losses: the last logged values. Exact match: `trainer eval --exact-match` (- when not run).",
        "",
    ]
    if unfinished:
        text += [f"Not finished (stopped or preempted): {', '.join(unfinished)}.", ""]
    text += ["![eval perplexity](eval_ppl.png)", "", "![train loss](train_loss.png)", ""]
    (out / "compare.md").write_text("\n".join(text))
    log(markdown_table(rows))
    log(f"compare: wrote {out / 'compare.md'}, compare.csv, eval_ppl.png, train_loss.png")
    return rows
