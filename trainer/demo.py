"""`trainer demo`: on a fresh CPU machine with no model hub, fine-tune the real SmolLM2-135M-Instruct on a task
with exact answers and show, in numbers, what training changed.

    model (offline, cached) -> task data (seeded) -> train (recipe from launch/recipes/) -> merge
    -> base vs tuned on the test split (exact match, perplexity) -> table + RUN_DIR/eval/report.{json,md}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.errors import UserError
from trainer.run_dir import FRESH, RunDir, check_output_dir, move_aside

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo_smollm2_task.yaml"


def write_task_data(out_dir: Path, n_rows: int, seed: int) -> Path:
    from trainer.demo_task import make_rows

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_rows, seed)))
    return path


def demo_recipe(
    model_dir: Path,
    data_path: Path,
    run_dir: Path,
    seed: int,
    recipe_path: Path = DEMO_RECIPE,
    overrides: list[str] = (),
):
    from trainer.config import load_recipe

    if not recipe_path.is_file():
        raise UserError(f"{recipe_path}: demo recipe not found; run the demo from a checkout of the repository")
    return load_recipe(
        recipe_path,
        [
            f"model.name_or_path={model_dir}",
            f"data.path={data_path}",
            f"output_dir={run_dir}",
            f"train.seed={seed}",
            f"data.split_seed={seed}",
            *overrides,
        ],
    )


def run_demo(
    output_dir: str | Path = "runs/demo",
    seed: int = 0,
    fresh: bool = False,
    model_dir: Path | None = None,
    n_rows: int | None = None,
    overrides: list[str] = (),
    log=print,
    export: str | None = None,
) -> dict:
    """The demo pipeline (module docstring); with `export` (a GGUF type such as "q4_k_m"), it ends with
    `trainer export RUN_DIR --gguf TYPE --check` and its hop table (report["export"] is the check report)."""
    from trainer import train
    from trainer.config import recipe_hash
    from trainer.evaluate import eval_run
    from trainer.merge import merge_run

    started = time.perf_counter()
    run_dir = Path(output_dir)
    timings = {}
    t0 = time.perf_counter()
    if model_dir is None:
        from trainer.demo_model import ensure_smollm2

        model_dir = ensure_smollm2(log=log)
    timings["model_s"] = round(time.perf_counter() - t0, 1)

    data_path = run_dir / "data" / "task.jsonl"
    recipe = demo_recipe(Path(model_dir), data_path, run_dir, seed, overrides=list(overrides))
    run = RunDir(run_dir)
    decision = check_output_dir(run, recipe, fresh=fresh)  # a folder that is not a run of ours is refused
    if decision == FRESH:  # nothing on disk is lost: the previous demo moves aside
        move_aside(run_dir, log=lambda m: log(f"demo: --fresh; {m}"))
    run.write_marker(recipe_hash(recipe))  # the task data is written inside: the folder is a run from here on
    n_rows = n_rows or _recipe_rows(recipe)
    write_task_data(data_path.parent, n_rows, seed)
    log(f"demo: {n_rows} task rows in {data_path}; recipe {DEMO_RECIPE.name}; run folder {run_dir}")

    t0 = time.perf_counter()
    train.run(recipe, show_progress=True)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    merge_run(run_dir, log=log)
    timings["merge_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    report = eval_run(run_dir, exact_match=True, merged=True, log=log)
    timings["eval_s"] = round(time.perf_counter() - t0, 1)
    exported = None
    if export:
        from trainer.export import export_run

        t0 = time.perf_counter()
        exported = export_run(run_dir, export, check=True, log=log)["report"]
        timings["export_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    report["timings"] = timings
    report["task"] = _task_name()
    RunDir(run_dir).eval_report.write_text(json.dumps(report, indent=1))
    print_table(report)
    if exported is not None:
        print_hop_table(exported)
        report["export"] = exported
    return report


def _recipe_rows(recipe) -> int:
    """Rows to generate: enough for the recipe's steps plus val and test."""
    t, d = recipe.train, recipe.data
    train_rows = (t.max_steps or 100) * t.global_batch(1)
    return int(round(train_rows / (1 - d.val_fraction - d.test_fraction)))


def _task_name() -> str:
    from trainer import demo_task

    return (demo_task.__doc__ or "").strip().splitlines()[0] if demo_task.__doc__ else "demo task"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"trainer demo: {report.get('task', '')}")
    table.add_column("model")
    table.add_column("exact match", justify="right")
    table.add_column("perplexity", justify="right")
    for name in ("base", "tuned"):
        e = report[name]
        table.add_row(name, f"{e['exact_match']:.3f} (n={e['exact_match_n']})", f"{e['perplexity']:.3f}")
    console.print(table)
    side = Table(title="side by side (greedy)", show_lines=True)
    for col in ("prompt", "reference", "base", "tuned"):
        side.add_column(col, overflow="fold")
    for s in report["samples"]:
        side.add_row(s["prompt"] or "", s["reference"] or "", s.get("base_greedy", ""), s.get("tuned_greedy", ""))
    console.print(side)
    t = report.get("timings", {})
    export = f", export + check {t['export_s']} s" if "export_s" in t else ""
    console.print(
        f"wall time: {t.get('total_s', '?')} s (model {t.get('model_s')} s, train {t.get('train_s')} s, "
        f"merge {t.get('merge_s')} s, eval {t.get('eval_s')} s{export})"
    )


def print_hop_table(report: dict) -> None:
    """base -> tuned -> shipped: the export check's hops (RUN_DIR/export/report.md has the details)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"shipped: every hop on the {report['split']} split ({report['conversations']} prompts)")
    for col in ("hop", "size (MiB)", "exact match", "perplexity", "stopped", "top-1 vs merged", "llama.cpp tok/s"):
        table.add_column(col, justify="left" if col == "hop" else "right")
    for hop in report["hops"]:
        vs = hop.get("vs_merged")
        table.add_row(
            hop["hop"],
            f"{hop['bytes'] / 2**20:.1f}",
            f"{hop['exact_match']:.3f}" if "exact_match" in hop else "-",
            f"{hop['perplexity']:.3f}",
            f"{hop['stopped']}/{hop['exact_match_n']}" if "stopped" in hop else "-",
            f"{vs['top1_agree']}/{vs['positions']}" if vs else "-",
            f"{hop['generation_tokens_per_s']:.0f}" if hop.get("generation_tokens_per_s") else "-",
        )
    console = Console()
    console.print(table)
    if report["failures"]:
        for line in report["failures"]:
            console.print(f"[red]check failed:[/red] {line}")
    else:
        console.print("export check: PASS (tokenization, template, top-1, stops)")
