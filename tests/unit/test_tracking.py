"""trainer.tracking: metrics.csv is never rewritten in place; what a run prints without a progress bar; report_to
checks, hyperparameter flattening, metrics.csv header upgrade."""

from __future__ import annotations

import builtins
import csv
import importlib.util
import os
from pathlib import Path

import pytest

from trainer import tracking
from trainer.errors import UserError
from trainer.run_dir import RunDir
from trainer.tracking import CSV_FIELDS, Tracker, format_seconds, keep_rows_up_to, read_metrics

HEADER = ",".join(CSV_FIELDS) + "\r\n"


def row(step: int, loss: float = 1.0) -> str:
    values = {"step": step, "epoch": 0, "loss": loss}
    return ",".join(str(values.get(f, "")) for f in CSV_FIELDS) + "\r\n"


def no_write_in_place(monkeypatch, path: Path):
    """Fail if `path` itself is opened for writing (the rename of a new file is the only way it may change)."""
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if Path(file) == path and any(m in mode for m in "wa+"):
            raise AssertionError(f"{path} opened with mode {mode!r}")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: guarded(self, mode, *a, **k))


def test_rows_after_the_checkpoint_are_dropped_by_writing_a_new_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.metrics.write_text(HEADER + "".join(row(s) for s in range(1, 7)))
    inode = os.stat(run.metrics).st_ino
    no_write_in_place(monkeypatch, run.metrics)
    keep_rows_up_to(run, 4)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(run.metrics)] == ["1", "2", "3", "4"]
    assert os.stat(run.metrics).st_ino != inode  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temp file left


def test_nothing_to_drop_leaves_the_file_untouched(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text(HEADER + row(1) + row(2))
    inode, data = os.stat(run.metrics).st_ino, run.metrics.read_bytes()
    keep_rows_up_to(run, 2)
    assert os.stat(run.metrics).st_ino == inode and run.metrics.read_bytes() == data


def test_a_torn_last_line_is_dropped(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text(HEADER + row(1) + row(2) + "3,0,2.")  # killed while writing step 3's row
    keep_rows_up_to(run, 2)
    assert run.metrics.read_bytes() == (HEADER + row(1) + row(2)).encode()
    assert [r["step"] for r in read_metrics(run.metrics)] == ["1", "2"]


def test_a_metrics_file_we_did_not_write_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_bytes(b"step,loss\r\n1,\xff\r\n")
    with pytest.raises(UserError, match=r"metrics\.csv: not UTF-8 text \(byte 0xff at byte offset 13\)"):
        keep_rows_up_to(run, 0)
    run.metrics.write_text("a,b\r\n1,2\r\n")
    with pytest.raises(UserError, match=r"metrics\.csv: not a metrics file written by trainer \(no step column\)"):
        keep_rows_up_to(run, 0)


def test_plain_lines_without_a_progress_bar(tmp_path, capsys):
    tracker = Tracker(RunDir(tmp_path), total_steps=10, start_step=4, show_progress=False)
    tracker.started -= 12.0  # 12 s for the 2 steps below: 6 s a step, 6 steps left
    tracker.log(6, {"loss": 1.23456, "lr": 2e-4, "tokens_per_s": 1234.4})
    tracker.log(6, {"eval_loss": 1.5, "eval_ppl": 4.4817})
    tracker.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 6/10: loss 1.2346, lr 2.00e-04, 1234 tok/s, ETA 24s",
        "step 6/10: eval loss 1.5000, ppl 4.48",
    ]


@pytest.mark.parametrize(
    "seconds, text", [(None, "?"), (float("nan"), "?"), (4.4, "4s"), (192, "3m12s"), (3720, "1h02m")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    tracking.check_report_to(["tensorboard", "csv"])  # never needs an optional package
    with pytest.raises(UserError) as err:
        tracking.check_report_to(["csv", "mlflow"])
    assert str(err.value) == (
        "train.report_to: mlflow needs the `mlflow` package, which is not installed; install the extra: "
        "pip install 'trainer[track]' (or remove mlflow from train.report_to)"
    )


def test_report_to_names_are_validated_with_the_recipe(tmp_path):
    from trainer.config import recipe_from_dict

    raw = {"data": {"path": "d.jsonl"}, "train": {"report_to": ["csv", "wandb", "neptune"]}}
    with pytest.raises(UserError) as err:
        recipe_from_dict(raw, "r.yaml")
    assert str(err.value) == (
        "r.yaml: train.report_to: 'neptune' is not a tracker; use any of tensorboard, csv, wandb, mlflow, trackio"
    )
    with pytest.raises(UserError, match="train.report_to='wandb' is not valid; expected a list"):
        recipe_from_dict({"data": {"path": "d"}, "train": {"report_to": "wandb"}}, "r.yaml")
    assert recipe_from_dict({"data": {"path": "d"}}).train.report_to == ("tensorboard", "csv")


def test_flat_hparams_are_scalars_every_tracker_takes():
    from trainer.config import Recipe, to_dict

    flat = tracking.flat_hparams(to_dict(Recipe()))
    assert flat["lora.r"] == 16 and flat["train.lr"] == 2e-4 and flat["model.quantization"] == "null"
    assert flat["train.adam_betas"] == "[0.9, 0.999]" and flat["train.report_to"] == "[tensorboard, csv]"
    assert flat["data.columns"] == "{}" and flat["train.max_steps"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_names_come_from_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = RunDir(tmp_path / "sweep" / "lora.r=4")
    tb, wb, ml, tr = tracking.accelerate_trackers(["tensorboard", "csv", "wandb", "mlflow", "trackio"], run, 6)
    assert (tb.name, tb.run_name, tb.logging_dir_param, tb.init_kwargs) == (
        "tensorboard",
        "tensorboard",
        str(run.root),
        {"purge_step": 6},
    )  # RUN_DIR/tensorboard, events after the resume step dropped
    assert (wb.run_name, wb.init_kwargs) == ("sweep", {"name": "lora.r=4", "dir": str(run.root)})
    assert (ml.experiment_name, ml.run_name) == ("sweep", "lora.r=4")
    assert (tr.run_name, tr.init_kwargs) == ("sweep", {"name": "lora.r=4"})
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert tracking.accelerate_trackers(["wandb"], run, 0)[0].run_name == "mine"


def test_a_metrics_csv_from_an_older_version_gets_the_new_header(tmp_path):
    """Resuming a run whose metrics.csv lacks the token-accuracy columns: rows keep their values by name."""
    path = tmp_path / "metrics.csv"
    old = [c for c in tracking.CSV_FIELDS if "token_accuracy" not in c]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old)
        w.writeheader()
        w.writerow({"step": 1, "loss": 2.5, "lr": 1e-3})
        w.writerow({"step": 2, "eval_loss": 2.4, "eval_ppl": 11.0})
    tracking.keep_rows_up_to(RunDir(tmp_path), 2)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == tracking.CSV_FIELDS
    assert (rows[0]["loss"], rows[0]["lr"], rows[0]["token_accuracy"]) == ("2.5", "0.001", "")
    assert (rows[1]["eval_ppl"], rows[1]["eval_token_accuracy"]) == ("11.0", "")
