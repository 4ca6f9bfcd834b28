"""Metrics out: metrics.csv (ours), the trackers of `train.report_to` (TensorBoard, W&B, MLflow, trackio, through
accelerate's tracker classes) and a rich progress bar. Built on rank 0 only (`make_tracker` returns a no-op
elsewhere), so no other module has to ask which rank it is on before logging.

Without a progress bar (`--no-progress`, or stdout not a terminal: a log file, a SLURM job) every logged step
and every eval is one plain line (step, loss, lr, tokens/s, ETA; eval loss and perplexity), so a run is never
silent. metrics.csv is only ever appended to; a resume that drops rows past its checkpoint writes a new file
and renames it over the old one, so a kill at any moment leaves the whole history.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from pathlib import Path

from trainer.errors import UserError
from trainer.run_dir import RunDir

OPTIONAL_TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""Tracker -> the package it needs, installed by the `track` extra (`pip install 'trainer[track]'`)."""

CSV_FIELDS = [
    "step",
    "epoch",
    "loss",
    "token_accuracy",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "target_tokens_per_s",
    "padding_frac",
    "samples_seen",
    "tokens_seen",
    "mem_gib",
    "elapsed_s",
    "eval_loss",
    "eval_ppl",
    "eval_token_accuracy",
    "skipped",
    "tflops",
    "mfu",
]  # model TFLOP/s per device; MFU only where the device's peak is known
TB_NAMES = {
    "loss": "train/loss",
    "token_accuracy": "train/token_accuracy",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "padding_frac": "train/padding_frac",
    "mem_gib": "memory/peak_gib",
    "eval_loss": "eval/loss",
    "eval_ppl": "eval/ppl",
    "eval_token_accuracy": "eval/token_accuracy",
    "tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
}


def check_report_to(report_to) -> None:
    """UserError (one line) when a tracker of `report_to` needs a package that is not installed. Called before
    anything heavy loads."""
    for name in report_to:
        package = OPTIONAL_TRACKERS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"train.report_to: {name} needs the `{package}` package, which is not installed; "
                f"install the extra: pip install 'trainer[track]' (or remove {name} from train.report_to)"
            )


def accelerate_trackers(report_to, run: RunDir, start_step: int) -> list:
    """accelerate's tracker objects for `report_to` (csv excluded: ours), not started yet.

    Names: the run name is the run folder's name, the project (W&B, trackio) / experiment (MLflow) its parent
    folder's name (`runs/sweep/lora.r=4` -> project `sweep`, run `lora.r=4`); WANDB_PROJECT and
    MLFLOW_EXPERIMENT_NAME override the project. TensorBoard writes RUN_DIR/tensorboard (a resumed run purges the
    events after its checkpoint's step), W&B RUN_DIR/wandb; MLflow's store is MLFLOW_TRACKING_URI (mlflow's default
    otherwise), trackio's its own.
    """
    import os

    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    check_report_to(report_to)
    root = run.root.resolve()
    name, project = root.name, root.parent.name or "trainer"
    out = []
    for kind in report_to:
        if kind == "tensorboard":
            out.append(TensorBoardTracker(run.tensorboard.name, str(run.root), purge_step=start_step or None))
        elif kind == "wandb":
            out.append(WandBTracker(os.environ.get("WANDB_PROJECT", project), name=name, dir=str(run.root)))
        elif kind == "mlflow":
            out.append(MLflowTracker(experiment_name=project, run_name=name))
        elif kind == "trackio":
            out.append(TrackioTracker(project, name=name))
    return out


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """A nested recipe dict as one level of `section.key` -> bool/int/float/str (lists and mappings as YAML flow
    text, None as "null"): what every tracker accepts as hyperparameters."""
    import yaml

    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "columns":
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif value is None:
            out[prefix + key] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
        else:
            out[prefix + key] = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return out


class Tracker:
    def __init__(
        self,
        run: RunDir,
        total_steps: int,
        start_step: int,
        show_progress: bool = True,
        report_to=("tensorboard", "csv"),
        hparams: dict | None = None,
        extra_fields=(),
    ):
        self.csv_path = run.metrics if "csv" in report_to else None
        self.extra = list(extra_fields)  # e.g. eval/loss/NAME per dataset: a CSV column and a tracker tag each
        if self.csv_path is not None:
            fields = CSV_FIELDS + self.extra
            keep_rows_up_to(run, start_step, fields)  # a resumed run drops what came after its checkpoint (new file)
            new = not self.csv_path.exists()
            self._csv_file = self.csv_path.open("a", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")
            if new:
                self._csv.writeheader()
        # accelerate's trackers; the hyperparameters once per session (not to TensorBoard, whose hparams plugin
        # adds two timestamped folders per call: the recipe is config.yaml beside it)
        self.trackers = accelerate_trackers(report_to, run, start_step)
        for tracker in self.trackers:
            tracker.start()
            if hparams and tracker.name != "tensorboard":
                tracker.store_init_configuration(hparams)
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.perf_counter()
        self.progress = None
        if show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict) -> None:
        if self.csv_path is not None:
            row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
            self._csv.writerow({"step": step, **row})
            self._csv_file.flush()
        named = {}
        for key, name in [*TB_NAMES.items(), *((k, k) for k in self.extra)]:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                named[name] = value
        for tracker in self.trackers:
            if named:
                tracker.log(named, step=step)
        if self.progress is not None and "loss" in metrics:
            self.progress.update(
                self.task,
                info=f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics.get('tokens_per_s', 0):.0f} tok/s",
            )
        elif self.progress is not None and "eval_loss" in metrics:
            self.progress.console.print(
                f"step {step}: eval loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}"
            )
        if self.progress is None:
            print(self.plain_line(step, metrics), flush=True)

    def plain_line(self, step: int, metrics: dict) -> str:
        """The line printed for a logged step or an eval when there is no progress bar."""
        head = f"step {step}/{self.total_steps}"
        if "loss" in metrics:
            done = step - self.start_step
            rest = (time.perf_counter() - self.started) / done * (self.total_steps - step) if done > 0 else None
            return (
                f"{head}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, "
                f"{metrics.get('tokens_per_s', 0):.0f} tok/s, ETA {format_seconds(rest)}"
            )
        return f"{head}: eval loss {metrics.get('eval_loss', float('nan')):.4f}, ppl {metrics.get('eval_ppl', float('nan')):.2f}"

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Stop the bar, flush and close the files; a write the storage refuses now (disk full) is not raised
        again here: the error that stopped the run is the one reported."""
        if self.progress is not None:
            self.progress.stop()
        for close in [
            *(tracker.finish for tracker in self.trackers),
            *([self._csv_file.close] if self.csv_path else []),
        ]:
            try:
                close()
            except OSError:
                pass


class NullTracker:
    def log(self, step, metrics):
        pass

    def advance(self, step):
        pass

    def print(self, message):
        pass

    def close(self):
        pass


def make_tracker(
    is_main: bool,
    run: RunDir,
    total_steps: int,
    start_step: int,
    show_progress: bool = True,
    report_to=("tensorboard", "csv"),
    hparams: dict | None = None,
    extra_fields=(),
):
    """The Tracker on rank 0 (metrics.csv when `report_to` has csv, accelerate's trackers for the rest, the
    hyperparameters `hparams` logged once), a no-op elsewhere: only rank 0 logs. `extra_fields`: metrics beyond
    CSV_FIELDS (eval/loss/NAME per dataset)."""
    if not is_main:
        return NullTracker()
    return Tracker(run, total_steps, start_step, show_progress, report_to, hparams, extra_fields)


def keep_rows_up_to(run: RunDir, step: int, fields: list[str] | None = None) -> None:
    """Drop metrics.csv rows after `step` (a resume continues from its checkpoint): the kept rows go to a new
    file that is renamed over metrics.csv, never rewritten in place; its header becomes `fields` (default
    CSV_FIELDS). A torn last line (a kill mid-write) is dropped. UserError when the file is not one we wrote
    (not UTF-8, no step column)."""
    from trainer.files import atomic_write_text, utf8_problem

    path = run.metrics
    if not path.exists():
        return
    data = path.read_bytes()
    problem = utf8_problem(data)
    if problem:
        raise UserError(f"{path}: {problem}; move it away to start a new one")
    text = data.decode("utf-8")
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    fields = fields or CSV_FIELDS
    if rows and "step" not in rows[0]:
        raise UserError(f"{path}: not a metrics file written by trainer (no step column); move it away")
    kept = [r for r in rows if _step(r) is not None and _step(r) <= step and None not in r.values()]
    if len(kept) == len(rows) and text.endswith("\n") and reader.fieldnames == fields:
        return
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, out.getvalue())


def _step(row: dict) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def format_seconds(seconds: float | None) -> str:
    """`1h02m`, `3m12s`, `45s`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))
