"""trainer.tracking: metrics.csv is never rewritten in place; what a run prints without a progress bar."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

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
