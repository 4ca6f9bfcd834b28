"""trainer/tracking.py without training: report_to checks, hyperparameter flattening, metrics.csv header upgrade."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from trainer import tracking
from trainer.errors import UserError
from trainer.run_dir import RunDir


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
    tracking.keep_rows_up_to(path, 2)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == tracking.CSV_FIELDS
    assert (rows[0]["loss"], rows[0]["lr"], rows[0]["token_accuracy"]) == ("2.5", "0.001", "")
    assert (rows[1]["eval_ppl"], rows[1]["eval_token_accuracy"]) == ("11.0", "")
