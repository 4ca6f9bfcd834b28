"""`train.report_to` with the real clients, offline: one tiny training run logs to metrics.csv, TensorBoard, W&B
(WANDB_MODE=offline: its run file read back record by record), MLflow (a SQLite store read back through
`mlflow.MlflowClient`) and trackio (its local SQLite store under TRACKIO_DIR); every tracker holds exactly the rows
of metrics.csv, the hyperparameters, and the run name of the run folder."""

from __future__ import annotations

import csv
import glob
import json
import struct
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, write_jsonl
from trainer.config import recipe_from_dict

pytest.importorskip("wandb", reason="pip install '.[track]'")
pytest.importorskip("mlflow", reason="pip install '.[track]'")
pytest.importorskip("trackio", reason="pip install '.[track]'")


def wandb_records(run_file: Path) -> list:
    """The protobuf Records of an offline W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    blocks of 32 KiB whose chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry the records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, off, out, buf = run_file.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:
            off += left
            continue
        _, length, kind = struct.unpack("<IHB", data[off : off + 7])
        if length == 0 and kind == 0:  # block padding
            off += left
            continue
        chunk, off = data[off + 7 : off + 7 + length], off + 7 + length
        if kind in (1, 4):
            out.append((buf if kind == 4 else b"") + chunk)
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def csv_series(run_dir: Path, column: str) -> dict[int, float]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(fh) if r[column]}


@pytest.mark.slow
def test_metrics_reach_wandb_mlflow_and_tensorboard(tiny_model_dir, tmp_path, monkeypatch):
    from trainer import train
    from trainer.sweep import reset_accelerate_state

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage
    import trackio.utils

    for module in (trackio.utils, trackio.sqlite_storage):  # read once at import: point both at this test's folder
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {b}."}, {"role": "assistant", "content": str(a + b)}]}
        for a, b in zip(range(30), range(30, 0, -1))
    ]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    run_dir = tmp_path / "experiment" / "r8"
    raw = tiny_recipe(
        tiny_model_dir,
        data,
        run_dir,
        data={"max_seq_len": 64, "val_fraction": 0.1},
        train={"max_steps": 4, "eval_every": 2, "report_to": ["csv", "tensorboard", "wandb", "mlflow", "trackio"]},
    )
    reset_accelerate_state()
    train.run(recipe_from_dict(raw), show_progress=False)
    loss, acc = csv_series(run_dir, "loss"), csv_series(run_dir, "token_accuracy")
    eval_loss, eval_acc = csv_series(run_dir, "eval_loss"), csv_series(run_dir, "eval_token_accuracy")
    assert sorted(loss) == [1, 2, 3, 4] and sorted(eval_loss) == [2, 4] and sorted(eval_acc) == [2, 4]

    # W&B: one offline run under RUN_DIR/wandb, named after the folder, project = the parent folder
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(Path(files[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("r8", "experiment")
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    got = {h["_step"]: h for h in history}
    for step, value in loss.items():  # metrics.csv rounds to 6 decimals
        assert got[step]["train/loss"] == pytest.approx(value, abs=1e-6)
        assert got[step]["train/token_accuracy"] == pytest.approx(acc[step], abs=1e-6)
    for step, value in eval_loss.items():
        assert got[step]["eval/loss"] == pytest.approx(value, abs=1e-6)
        assert got[step]["eval/token_accuracy"] == pytest.approx(eval_acc[step], abs=1e-6)
    config = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for i in r.config.update
    }
    config.update({i.key: json.loads(i.value_json) for i in run.config.update})
    assert config["lora.r"] == {"value": 8} or config["lora.r"] == 8
    assert sum(r.WhichOneof("record_type") == "config" for r in records) <= 1  # hyperparameters once

    # MLflow: experiment = the parent folder, one run named after the folder, every metric row and the params
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["r8"] and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(history) == sorted(loss)
    for step, value in loss.items():
        assert history[step] == pytest.approx(value, abs=1e-6)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval/token_accuracy")}
    assert history == pytest.approx(eval_acc, abs=1e-6)
    params = runs[0].data.params
    assert params["lora.r"] == "8" and params["train.max_steps"] == "4" and params["output_dir"] == str(run_dir)

    # TensorBoard: still RUN_DIR/tensorboard, the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/token_accuracy")}
    assert tb == pytest.approx(acc, abs=1e-6)
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir())[0].startswith("events.out.tfevents")

    # trackio: project = the parent folder, run = the folder, the same rows and the hyperparameters
    from trackio import SQLiteStorage

    logs = SQLiteStorage.get_logs("experiment", "r8")
    got = {}
    for entry in logs:
        got.setdefault(entry["step"], {}).update(entry)
    for step, value in loss.items():
        assert got[step]["train/loss"] == pytest.approx(value, abs=1e-6)
    assert {s: got[s]["eval/token_accuracy"] for s in eval_acc} == pytest.approx(eval_acc, abs=1e-6)
    assert SQLiteStorage.get_run_config("experiment", "r8")["lora.r"] == 8
