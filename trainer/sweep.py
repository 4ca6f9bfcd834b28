"""`trainer sweep RECIPE key=v1,v2 [key=v1,v2 ...] [--name NAME] [--gpus N --gpu-mem GiB]`: train a grid of recipe
variants one after the other in this process, then compare them (`trainer.compare`).

    trainer sweep r.yaml lora.r=4,8,16 lora=null          4 runs: r=4, r=8, r=16 and a full fine-tune
    trainer sweep r.yaml lora.r=8,16 train.lr=1e-4,3e-4   4 runs: the grid, r slowest

Values are split on commas outside brackets, braces and quotes, and each is parsed as YAML like any override
(`lora=null`, `lora.target_modules=[q_proj,v_proj],all-linear`, `model.name_or_path=A,B`). The points are the grid
of the axes in the order given (the first axis varies slowest), with one exception that makes the example above
mean what it says: axes whose keys nest (`lora` and `lora.r`) are alternatives, listed one after the other in the
order given, not crossed (crossing `lora=null` with `lora.r` would only repeat the full fine-tune).

Every point is a normal run folder `runs/NAME/<key=value,...>` (NAME: the recipe file's stem unless --name), named by
the values of the axes that vary: `lora.r=4`, `lora=null`, `lora.r=8,train.lr=1e-4`. A point whose run_summary.json
says it finished is skipped; any other point runs through `trainer train`'s own resume (rerunning the same command
after a kill continues the interrupted point exactly, from its last checkpoint). Under `accelerate launch` every
point runs under that launch (accelerate's state is reset between points, its process group kept).
`runs/NAME/sweep.json` records the points and what happened to each; the sweep ends with `trainer compare` over its
points into `runs/NAME/compare/`.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.errors import UserError
from trainer.files import atomic_write_text
from trainer.run_dir import claim_folder

SAFE = re.compile(r"[^A-Za-z0-9._=+@-]")
MAX_NAME = 120


# ----------------------------------------------------------------------------------------------- parsing
def split_values(text: str) -> list[str]:
    """`a,[b,c],{d: 1, e: 2},'f,g'` -> ['a', '[b,c]', '{d: 1, e: 2}', "'f,g'"]: commas inside brackets, braces or
    quotes do not split. UserError for unbalanced brackets or an empty value."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise UserError(f"sweep value '{text}': unbalanced '{ch}'")
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise UserError(f"sweep value '{text}': unclosed bracket or quote")
    values.append(text[start:])
    if any(not v.strip() for v in values):
        raise UserError(f"sweep value '{text}': an empty value between commas")
    return [v.strip() for v in values]


@dataclass(frozen=True)
class Axis:
    """One `key=v1,v2,...` argument: the key and each value as written (parsed later, as YAML, like overrides)."""

    key: str
    values: tuple[str, ...]


def parse_axes(items: list[str]) -> list[Axis]:
    """The sweep's `key=v1,v2` arguments as axes; UserError for a malformed or repeated key."""
    axes, seen = [], set()
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UserError(f"sweep argument '{item}': expected key.path=v1,v2,... e.g. lora.r=4,8")
        key, text = item.split("=", 1)
        key = key.strip()
        if key == "output_dir":
            raise UserError(f"sweep argument '{item}': the sweep names each point's output_dir; use --name NAME")
        if key in seen:
            raise UserError(f"sweep argument '{item}': {key} is given twice; list all its values in one argument")
        seen.add(key)
        values = split_values(text)
        for v in values:
            try:
                yaml.safe_load(v)
            except yaml.YAMLError as err:
                raise UserError(f"sweep argument '{item}': value {v!r} is not valid YAML ({err})") from None
        axes.append(Axis(key, tuple(values)))
    return axes


def _nests(a: str, b: str) -> bool:
    return a.startswith(b + ".") or b.startswith(a + ".")


def grid(axes: list[Axis]) -> list[list[tuple[str, str]]]:
    """The points: lists of (key, value text) assignments, in order (first group slowest).

    Axes are grouped when their keys nest (one is a dotted prefix of the other, e.g. `lora` and `lora.r`); inside a
    group, the axes that do not nest with one another are crossed and the results are alternatives one after the
    other. Groups are crossed."""
    groups: list[list[Axis]] = []
    for axis in axes:
        joined = [g for g in groups if any(_nests(axis.key, other.key) for other in g)]
        merged = [a for g in joined for a in g] + [axis]
        groups = [g for g in groups if g not in joined]
        groups.append(sorted(merged, key=axes.index))
    groups.sort(key=lambda g: axes.index(g[0]))
    return [[kv for part in combo for kv in part] for combo in itertools.product(*map(_alternatives, groups))]


def _alternatives(group: list[Axis]) -> list[list[tuple[str, str]]]:
    """Alternatives of a group of nesting axes: each maximal set of mutually non-nesting axes, taken in the order
    given, is crossed; the sets follow one another."""
    layers: list[list[Axis]] = []
    for axis in group:
        layer = next((lay for lay in layers if not any(_nests(axis.key, a.key) for a in lay)), None)
        if layer is None:
            layers.append([axis])
        else:
            layer.append(axis)
    out = []
    for layer in layers:
        for combo in itertools.product(*[[(a.key, v) for v in a.values] for a in layer]):
            out.append(list(combo))
    return out


# ----------------------------------------------------------------------------------------------- names
def value_label(text: str) -> str:
    """A value as it appears in a folder name: lists joined by '+', a path by its last component, any character
    other than letters, digits and ._=+@- as '_'."""
    text = text.strip()
    if text[:1] == "[" and text[-1:] == "]":
        text = "+".join(part.strip().strip("'\"") for part in split_values(text[1:-1]))
    elif "/" in text:
        text = text.rstrip("/").rsplit("/", 1)[-1] or text
    return SAFE.sub("_", text.strip("'\""))


def point_names(points: list[list[tuple[str, str]]], axes: list[Axis]) -> list[str]:
    """Folder names: `key=value` of the varying keys joined by ','. Names that would collide (two paths with the
    same last component) get a short hash of their full assignments; over-long names are cut and hashed."""
    varying = {a.key for a in axes if len(a.values) > 1}
    # a single-valued axis that is an alternative to others (lora=null) is not in every point: it varies too
    varying |= {a.key for a in axes if sum(any(k == a.key for k, _ in p) for p in points) < len(points)}
    names = []
    for point in points:
        shown = [(k, v) for k, v in point if k in varying] or point
        name = ",".join(f"{k}={value_label(v)}" for k, v in shown) or "recipe"
        if len(name) > MAX_NAME:
            name = name[: MAX_NAME - 9] + "~" + _digest(point)
        names.append(name)
    for name in {n for n in names if names.count(n) > 1}:
        for i, n in enumerate(names):
            if n == name:
                names[i] = f"{n}~{_digest(points[i])}"
    if len(set(names)) != len(names):
        raise UserError("sweep: two points have the same values; remove the repeated value")
    return names


def _digest(point) -> str:
    return hashlib.sha256(json.dumps(point).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- the sweep
@dataclass
class Point:
    """One run of the sweep."""

    name: str
    overrides: list[str]
    run_dir: Path
    recipe: object = None
    status: str = "pending"  # pending | done (finished before) | trained | skipped (does not fit) | failed
    note: str = ""
    timings: dict = field(default_factory=dict)


def plan_sweep(
    recipe_path: str | Path, axis_args: list[str], name: str | None = None, runs_root: str | Path = "runs"
) -> tuple[Path, list[Point]]:
    """(sweep folder, points with validated recipes): every point's recipe is loaded and validated before anything
    trains, so a bad value fails at once (one line per problem, naming the point)."""
    from trainer.config import load_recipe

    recipe_path = Path(recipe_path)
    axes = parse_axes(axis_args)
    points = grid(axes)
    names = point_names(points, axes)
    folder = Path(runs_root) / (name or recipe_path.stem)
    out, problems = [], []
    for point, point_name in zip(points, names):
        overrides = [f"{k}={v}" for k, v in point]
        run_dir = folder / point_name
        try:
            recipe = load_recipe(recipe_path, [*overrides, f"output_dir={run_dir}"])
        except UserError as err:
            problems += [f"sweep point {point_name}: {line}" for line in str(err).splitlines()]
            continue
        out.append(Point(point_name, overrides, run_dir, recipe))
    if problems:
        raise UserError("\n".join(problems))
    return folder, out


def is_finished(run_dir: Path) -> bool:
    """Whether a run folder holds a finished run: run_summary.json written at the end and not preempted."""
    from trainer.run_dir import RunDir

    path = RunDir(run_dir).summary
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return not summary.get("preempted")


def screen(points: list[Point], *, gpus: int, gpu_mem_gib: float, log=print) -> None:
    """The memory estimator over every point (ZeRO-2 when gpus > 1, like `trainer estimate`): points that do not fit
    get status `skipped` and are listed, before anything trains."""
    from trainer.estimate import estimate, load_model_config

    configs = {}
    for p in points:
        name = p.recipe.model.name_or_path
        if name not in configs:
            configs[name] = load_model_config(name)
        est = estimate(p.recipe, configs[name], gpus=gpus, gpu_mem_gib=gpu_mem_gib, zero_stage=2 if gpus > 1 else 0)
        verdict = f"{est.total / 2**30:.1f} GiB of {gpu_mem_gib:g} GiB per GPU"
        if est.fits:
            log(f"sweep: {p.name}: fits ({verdict})")
        else:
            p.status, p.note = "skipped", f"does not fit on {gpus} x {gpu_mem_gib:g} GiB ({verdict})"
            log(f"sweep: {p.name}: SKIPPED, {p.note}")


def reset_accelerate_state() -> None:
    """Forget the previous point's accelerate settings (mixed precision, accumulation, DeepSpeed plugin) so the next
    point builds its own Accelerator; the process group (PartialState) is kept for the launch's other ranks."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def run_sweep(
    recipe_path: str | Path,
    axis_args: list[str],
    *,
    name: str | None = None,
    gpus: int | None = None,
    gpu_mem_gib: float | None = None,
    runs_root: str | Path = "runs",
    show_progress: bool = True,
    log=print,
) -> dict:
    """`trainer sweep`: plan, screen (with gpus and gpu_mem_gib), train every point not finished, compare.

    Returns the sweep record (also `runs/NAME/sweep.json`). A point that fails with a user error (e.g. its loss
    diverged) is recorded and the others still run; UserError at the end names the failed points (exit 2). A
    preemption signal stops the sweep with the trainer's preemption exit code: rerun to continue."""
    from trainer import train
    from trainer.distributed import is_main

    started = time.perf_counter()
    folder, points = plan_sweep(recipe_path, axis_args, name, runs_root)
    main = is_main()
    say = log if main else (lambda m: None)
    if main:  # a folder that holds something else is refused before anything is written
        claim_folder(folder, ".trainer-sweep", "a sweep", "Give another --name or --runs-root")
    say(f"sweep: {len(points)} point(s) in {folder}: {', '.join(p.name for p in points)}")
    if (gpus is None) != (gpu_mem_gib is None):
        raise UserError("sweep: --gpus and --gpu-mem go together (the estimator needs both)")
    if gpus is not None:
        screen(points, gpus=gpus, gpu_mem_gib=gpu_mem_gib, log=say)
    record = {"recipe": str(recipe_path), "axes": list(axis_args), "folder": str(folder)}
    for i, p in enumerate(points, 1):
        if p.status == "skipped":
            continue
        if is_finished(p.run_dir):
            p.status, p.note = "done", "finished before; skipped"
            say(f"sweep: [{i}/{len(points)}] {p.name}: finished before, skipped")
            continue
        say(f"sweep: [{i}/{len(points)}] {p.name}: {' '.join(p.overrides)} -> {p.run_dir}")
        t0 = time.perf_counter()
        reset_accelerate_state()
        try:
            train.run(p.recipe, show_progress=show_progress)
            p.status = "trained"
        except UserError as err:
            p.status, p.note = "failed", str(err)
            say(f"sweep: {p.name} failed: {err}")
        finally:
            p.timings["wall_s"] = round(time.perf_counter() - t0, 1)
            _free_memory()
            if main:
                _write_record(folder, record, points, started)
    ran = [p.run_dir for p in points if p.status in ("done", "trained")]
    if main and ran:
        from trainer.compare import compare_runs
        from trainer.plots import plot_metrics
        from trainer.run_dir import RunDir
        from trainer.tracking import read_metrics

        for run_dir in ran:  # each point's own curves (plots/loss.png, eval_ppl.png, lr.png), titled with its name
            run = RunDir(run_dir)
            if run.metrics.is_file():
                plot_metrics(read_metrics(run.metrics), run.plots, run.root.name)
        compare_runs(ran, folder / "compare", log=say)
    record = _write_record(folder, record, points, started) if main else record
    say(f"sweep: {len(ran)} of {len(points)} point(s) finished in {time.perf_counter() - started:.1f} s")
    failed = [p for p in points if p.status == "failed"]
    if failed:
        raise UserError(
            f"sweep: {len(failed)} point(s) failed: "
            + "; ".join(f"{p.name}: {p.note.splitlines()[0]}" for p in failed)
            + "; fix them and rerun the same command (finished points are skipped)"
        )
    return record


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_record(folder: Path, record: dict, points: list[Point], started: float) -> dict:
    """runs/NAME/sweep.json: the command's recipe and axes, each point's overrides, status and wall time."""
    record = {
        **record,
        "wall_s": round(time.perf_counter() - started, 1),
        "points": [
            {
                "name": p.name,
                "overrides": p.overrides,
                "run_dir": str(p.run_dir),
                "status": p.status,
                "note": p.note,
                **p.timings,
            }
            for p in points
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "sweep.json", json.dumps(record, indent=1))
    return record
