"""Metrics out: CSV, TensorBoard scalars and a rich progress bar. Built on rank 0 only (`make_tracker`
returns a no-op elsewhere), so no other module has to ask which rank it is on before logging."""

from __future__ import annotations

import csv
import math
from pathlib import Path

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
        keep_rows_up_to(self.csv_path, start_step, fields)  # a resumed run rewrites what came after its checkpoint
        new = not self.csv_path.exists()
        self._csv_file = self.csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self.tb = SummaryWriter(str(run.tensorboard), purge_step=start_step or None)
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

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.tb.close()
        self._csv_file.close()


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


def keep_rows_up_to(path: Path, step: int, fields: list[str] | None = None) -> None:
    """Drop metrics.csv rows after `step` (a resumed run writes them again); the header becomes `fields`."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    kept = [r for r in rows if r.get("step") and int(r["step"]) <= step]
    fields = fields or CSV_FIELDS
    if len(kept) == len(rows) and header == fields:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))
