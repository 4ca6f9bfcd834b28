"""Plots (matplotlib, Agg backend): training curves from metrics.csv and where LoRA acted, by layer and module."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weight_deltas(rows: list[dict], png_path: Path) -> Path:
    """Relative LoRA update ||alpha/r B@A|| / ||W|| by layer, one line per module type (rows from
    `evaluate.lora_weight_deltas`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in sorted({r["type"] for r in rows}):
        pts = sorted((r["layer"], r["relative"]) for r in rows if r["type"] == t)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xlabel("layer")
    ax.set_ylabel("||alpha/r · B·A|| / ||W||")
    ax.set_title("Where fine-tuning acted: relative LoRA update by layer and module")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _auto_log(ax, values: list[float], ratio: float = 10.0) -> bool:
    """Log y scale when the positive values span more than `ratio` (a falling loss: the late steps stay readable)."""
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > ratio:
        ax.set_yscale("log")
        return True
    return False


def series(metrics: list[dict], column: str) -> list[tuple[int, float]]:
    """(step, value) of the metrics.csv rows (`tracking.read_metrics`) where `column` has a finite value."""
    import math

    out = []
    for r in metrics:
        text = r.get(column)
        if text not in (None, ""):
            value = float(text)
            if math.isfinite(value):
                out.append((int(r["step"]), value))
    return out


def runs_figure(lines: dict[str, list[tuple[int, float]]], *, title: str, ylabel: str, log_ratio: float = 10.0):
    """Every run's (step, value) line on one pair of axes (shared scales): labelled axes, a legend, integer step
    ticks, log y when the values span more than `log_ratio`, markers when a line has few points. Returns the figure
    (the caller saves and closes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    values = []
    for label, pts in lines.items():
        if not pts:
            continue
        values += [v for _, v in pts]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) <= 30 else None, ms=4, label=label)
    scale = " (log scale)" if _auto_log(ax, values, log_ratio) else ""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel + scale)
    ax.set_title(title)
    _integer_steps(ax)
    ax.grid(True, alpha=0.3, which="both")
    if any(lines.values()):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_runs(
    lines: dict[str, list[tuple[int, float]]], png_path: Path, *, title: str, ylabel: str, log_ratio: float = 10.0
) -> Path:
    """`runs_figure` saved as a PNG."""
    fig = runs_figure(lines, title=title, ylabel=ylabel, log_ratio=log_ratio)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    _pyplot().close(fig)
    return png_path


def plot_metrics(metrics: list[dict], plots_dir: Path, run_name: str = "") -> list[Path]:
    """`loss.png` (train and eval loss vs step), `eval_ppl.png` (eval perplexity vs step) and `lr.png` from
    metrics.csv rows (`tracking.read_metrics`); titles carry `run_name`."""
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    name = f": {run_name}" if run_name else ""
    loss = plot_runs(
        {"train loss": series(metrics, "loss"), "eval loss": series(metrics, "eval_loss")},
        plots_dir / "loss.png",
        title=f"Loss vs step{name}",
        ylabel="loss (mean over target tokens)",
    )
    ppl = plot_runs(
        {"eval perplexity": series(metrics, "eval_ppl")},
        plots_dir / "eval_ppl.png",
        title=f"Eval perplexity vs step{name}",
        ylabel="perplexity",
        log_ratio=3.0,
    )
    lr = series(metrics, "lr")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([s for s, _ in lr], [v for _, v in lr])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Learning rate vs step{name}")
    _integer_steps(ax)
    fig.tight_layout()
    fig.savefig(plots_dir / "lr.png", dpi=110)
    plt.close(fig)
    return [loss, ppl, plots_dir / "lr.png"]
