"""trainer/plots.py: a run's own curves carry its name and integer step ticks; eval perplexity has its own plot."""

from __future__ import annotations

import pytest

from trainer import plots


def test_plot_metrics_writes_titled_curves_with_integer_steps(tmp_path, monkeypatch):
    rows = [{"step": str(s), "loss": str(3.0 / s), "lr": "0.001", "eval_loss": "", "eval_ppl": ""} for s in (1, 2, 3)]
    rows += [{"step": "3", "loss": "", "lr": "", "eval_loss": "0.9", "eval_ppl": "2.46"}]
    figures = []
    real = plots.runs_figure
    monkeypatch.setattr(plots, "runs_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    paths = plots.plot_metrics(rows, tmp_path / "plots", "lora.r=4")
    assert [p.name for p in paths] == ["loss.png", "eval_ppl.png", "lr.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    loss, ppl = (f.axes[0] for f in figures)
    assert loss.get_title() == "Loss vs step: lora.r=4" and ppl.get_title() == "Eval perplexity vs step: lora.r=4"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train loss", "eval loss"]
    assert list(ppl.get_lines()[0].get_ydata()) == [2.46]
    assert all(float(t).is_integer() for t in loss.get_xticks())


def test_series_skips_empty_and_non_finite_cells():
    rows = [{"step": "1", "x": "1.5"}, {"step": "2", "x": ""}, {"step": "3", "x": "nan"}, {"step": "4", "x": "2"}]
    assert plots.series(rows, "x") == [(1, 1.5), (4, 2.0)]
    assert plots.series(rows, "missing") == []


@pytest.mark.parametrize("values, log", [([100.0, 1.0], True), ([2.0, 1.5], False), ([], False)])
def test_log_scale_only_when_the_values_span_a_wide_range(values, log):
    fig = plots.runs_figure({"a": list(enumerate(values, 1))}, title="t", ylabel="y")
    assert (fig.axes[0].get_yscale() == "log") is log
