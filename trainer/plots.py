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


def plot_metrics(metrics: list[dict], plots_dir: Path) -> list[Path]:
    """`loss.png` (train loss and eval loss vs step) and `lr.png` from metrics.csv rows (`tracking.read_metrics`)."""
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    train = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in metrics if r.get("loss")]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in metrics if r.get("eval_loss")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([s for s, _, _ in train], [v for _, v, _ in train], label="train loss", alpha=0.8)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([s for s, _, _ in train], [lr for _, _, lr in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(plots_dir / "lr.png", dpi=110)
    plt.close(fig)
    return [plots_dir / "loss.png", plots_dir / "lr.png"]
