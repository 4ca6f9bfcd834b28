"""Metrics out: CSV, TensorBoard scalars and a rich progress bar. Built on rank 0 only (`make_tracker`
returns a no-op elsewhere), so no other module has to ask which rank it is on before logging.

Without a progress bar (`--no-progress`, or stdout not a terminal: a log file, a SLURM job) every logged step
and every eval is one plain line (step, loss, lr, tokens/s, ETA; eval loss and perplexity), so a run is never
silent. metrics.csv is only ever appended to; a resume that drops rows past its checkpoint writes a new file
and renames it over the old one, so a kill at any moment leaves the whole history.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

from trainer.errors import UserError
from trainer.run_dir import RunDir

CSV_FIELDS = [
    "step",
    "epoch",
    "loss",
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
    "skipped",
    "tflops",
    "mfu",
]  # model TFLOP/s per device; MFU only where the device's peak is known
TB_NAMES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "padding_frac": "train/padding_frac",
    "mem_gib": "memory/peak_gib",
    "eval_loss": "eval/loss",
    "eval_ppl": "eval/ppl",
    "tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
}


class Tracker:
    def __init__(self, run: RunDir, total_steps: int, start_step: int, show_progress: bool = True, extra_fields=()):
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = run.metrics
        self.extra = list(extra_fields)  # e.g. eval/loss/NAME per dataset: a CSV column and a TensorBoard tag each
        fields = CSV_FIELDS + self.extra
        keep_rows_up_to(run, start_step, fields)  # a resumed run drops what came after its checkpoint (new file)
        new = not self.csv_path.exists()
        self._csv_file = self.csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self.tb = SummaryWriter(str(run.tensorboard), purge_step=start_step or None)
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
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        self._csv.writerow({"step": step, **row})
        self._csv_file.flush()
        for key, name in [*TB_NAMES.items(), *((k, k) for k in self.extra)]:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(name, value, step)
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
        for close in (self.tb.close, self._csv_file.close):
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
    is_main: bool, run: RunDir, total_steps: int, start_step: int, show_progress: bool = True, extra_fields=()
):
    """The Tracker on rank 0, a no-op elsewhere. `extra_fields`: metrics beyond CSV_FIELDS (eval/loss/NAME)."""
    return Tracker(run, total_steps, start_step, show_progress, extra_fields) if is_main else NullTracker()


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
