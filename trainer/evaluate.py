"""Evaluation: loss and perplexity over a split, gathered across ranks."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer.data import collate
from trainer.model import token_loss_sum


@torch.no_grad()
def dataset_loss(model, rows, *, batch_size: int, pad_id: int, device, rank: int = 0, world: int = 1,
                 reduce=None, max_batches: int | None = None) -> dict:
    """Mean next-token loss over every target token of `rows` (rank r takes rows r, r+world, ...).

    `reduce(tensor)` sums across ranks (accelerator.reduce); perplexity is exp(mean token loss).
    """
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(rows), world))
    if max_batches is not None:
        mine = mine[: max_batches * batch_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(mine), batch_size):
        batch = collate(rows.select(mine[start:start + batch_size]), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n = token_loss_sum(model, batch)
        totals += torch.stack([loss_sum.double(), n.double()])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss_sum, n = totals.tolist()
    loss = loss_sum / n if n else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if n else float("nan"), "tokens": int(n)}


# ----------------------------------------------------------------------------------------------- run report
def split_for_eval(data):
    """(name, rows): the test split, else val."""
    if data.test is not None:
        return "test", data.test
    if data.val is not None:
        return "val", data.val
    from trainer.errors import UserError
    raise UserError("the run has neither a test nor a val split (data.test_fraction and data.val_fraction are 0)")


def conversations(recipe, sample_ids: list[int]) -> list[dict]:
    """Prompt messages (everything before the last assistant turn) and the reference reply, by sample id."""
    from trainer.data import detect_format, read_rows, row_to_messages

    raw = read_rows(recipe.data)
    fmt = detect_format(raw.column_names, recipe.data)
    out = []
    for sid in sample_ids:
        msgs = row_to_messages(raw[sid], fmt, recipe.data.columns, f"row {sid}")
        if isinstance(msgs, str):
            out.append({"id": sid, "prompt": None, "reference": None})
            continue
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"id": sid, "prompt": msgs[:last], "reference": msgs[last]["content"]})
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0) -> list[str]:
    """Batched generation with left padding; returns the decoded replies."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            torch.manual_seed(seed + start)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
            replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return [r.strip() for r in replies]


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".").strip()


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def evaluate_models(models: dict, tokenizer, rows, convs: list[dict], recipe, *, exact_match: bool,
                    num_samples: int, log=print) -> dict:
    """Perplexity for each model on `rows`; exact match over `convs` (greedy) when asked; sample generations.

    `models` maps a name ("base", "tuned") to a callable context manager yielding the model, so one loaded
    PEFT model can serve as base (adapter disabled) and tuned.
    """
    gen = recipe.generation
    report, samples = {}, [{"id": c["id"], "prompt": c["prompt"][-1]["content"] if c["prompt"] else None,
                            "reference": c["reference"]} for c in convs[:num_samples]]
    usable = [c for c in convs if c["prompt"]]
    for name, use in models.items():
        with use() as model:
            device = next(model.parameters()).device
            ppl = dataset_loss(model, rows, batch_size=recipe.train.eval_batch_size,
                               pad_id=tokenizer.pad_token_id, device=device)
            entry = {"loss": ppl["loss"], "perplexity": ppl["ppl"], "tokens": ppl["tokens"]}
            targets = usable if exact_match else usable[:num_samples]
            greedy = generate(model, tokenizer, [c["prompt"] for c in targets], max_new_tokens=gen.max_new_tokens)
            if exact_match:
                entry["exact_match"] = exact_match_rate(greedy, [c["reference"] for c in targets])
                entry["exact_match_n"] = len(targets)
            sampled = generate(model, tokenizer, [c["prompt"] for c in usable[:num_samples]], do_sample=True,
                               temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
            for s, g, smp in zip(samples, greedy, sampled):
                s[f"{name}_greedy"], s[f"{name}_sampled"] = g, smp
            report[name] = entry
            log(f"eval: {name}: loss {entry['loss']:.4f} ppl {entry['perplexity']:.3f}"
                + (f" exact match {entry['exact_match']:.3f} (n={len(targets)})" if exact_match else ""))
    report["samples"] = samples
    return report


def report_markdown(report: dict) -> str:
    names = [n for n in ("base", "tuned") if n in report]
    lines = ["# Evaluation", "", f"Split: {report.get('split', '?')}", "",
             "| model | exact match | perplexity | loss |", "| --- | --- | --- | --- |"]
    for n in names:
        e = report[n]
        em = f"{e['exact_match']:.3f}" if "exact_match" in e else "-"
        lines.append(f"| {n} | {em} | {e['perplexity']:.3f} | {e['loss']:.4f} |")
    lines += ["", "## Samples", ""]
    for s in report["samples"]:
        lines += [f"### sample {s['id']}", "", f"**prompt:** {s['prompt']}", "", f"**reference:** {s['reference']}", ""]
        for n in names:
            lines += [f"**{n} (greedy):** {s.get(n + '_greedy', '')}", "",
                      f"**{n} (sampled):** {s.get(n + '_sampled', '')}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- weight deltas
def lora_weight_deltas(peft_model) -> list[dict]:
    """For every adapted module: ||alpha/r * B @ A|| absolute and relative to the frozen weight (Frobenius)."""
    rows = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
            continue
        for adapter in module.lora_A.keys():
            delta = module.get_delta_weight(adapter).float()
            base = module.get_base_layer().weight
            if base.__class__.__name__ == "Params4bit":
                import bitsandbytes.functional as bnbf
                base = bnbf.dequantize_4bit(base.data, base.quant_state)
            norm = float(delta.norm())
            base_norm = float(base.float().norm())
            layer = next((int(p) for p in name.split(".") if p.isdigit()), -1)
            rows.append({"module": name.replace("base_model.model.", ""), "layer": layer,
                         "type": name.split(".")[-1], "delta_norm": norm, "weight_norm": base_norm,
                         "relative": norm / base_norm if base_norm else float("nan")})
    return rows


def write_weight_deltas(rows: list[dict], csv_path: Path, png_path: Path) -> None:
    import csv

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["module", "layer", "type", "delta_norm", "weight_norm", "relative"])
        w.writeheader()
        w.writerows(rows)
    plt = _pyplot()
    types = sorted({r["type"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in types:
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


def write_metric_plots(metrics_csv: Path, plots_dir: Path) -> list[Path]:
    from trainer.tracking import read_metrics

    rows = read_metrics(metrics_csv)
    plt = _pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    train = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in rows if r.get("loss")]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([s for s, _, _ in train], [l for _, l, _ in train], label="train loss", alpha=0.8)
    if evals:
        ax.plot([s for s, _ in evals], [l for _, l in evals], marker="o", label="eval loss")
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


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def eval_run(run_dir: Path, *, exact_match: bool = False, merged: bool = False, log=print) -> dict:
    """`trainer eval RUN_DIR`: base vs tuned on the run's test split (val when none); report files and plots."""
    import contextlib
    import json

    from trainer.data import prepare_data
    from trainer.merge import adapter_dir, load_tuned, run_recipe, run_tokenizer
    from trainer.model import DTYPES, load_base

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    tokenizer = run_tokenizer(run_dir, recipe)
    data = prepare_data(recipe.data, tokenizer, log=lambda m: None)
    split, rows = split_for_eval(data)
    convs = conversations(recipe, [s for r in rows["sample_ids"] for s in r])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    deltas = []
    if recipe.lora is None:
        base = load_base(recipe.model, dtype=DTYPES[recipe.model.dtype], quantize=False, device_map={"": device})
        from transformers import AutoModelForCausalLM
        tuned = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), dtype=DTYPES[recipe.model.dtype]).to(device)
        models = {"base": lambda: contextlib.nullcontext(base.eval()), "tuned": lambda: contextlib.nullcontext(tuned.eval())}
    elif merged and (run_dir / "merged").is_dir():
        from transformers import AutoModelForCausalLM
        base = load_base(recipe.model, dtype=DTYPES[recipe.model.dtype], quantize=False, device_map={"": device})
        tuned = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=DTYPES[recipe.model.dtype]).to(device)
        models = {"base": lambda: contextlib.nullcontext(base.eval()), "tuned": lambda: contextlib.nullcontext(tuned.eval())}
    else:
        peft_model = load_tuned(recipe, adapter_dir(run_dir), device_map={"": device})
        deltas = lora_weight_deltas(peft_model)

        @contextlib.contextmanager
        def base_ctx():
            with peft_model.disable_adapter():
                yield peft_model
        models = {"base": base_ctx, "tuned": lambda: contextlib.nullcontext(peft_model)}
    report = {"split": split, **evaluate_models(models, tokenizer, rows, convs, recipe, exact_match=exact_match,
                                                num_samples=recipe.generation.num_samples, log=log)}
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    if (run_dir / "metrics.csv").exists():
        write_metric_plots(run_dir / "metrics.csv", run_dir / "plots")
    if deltas:
        write_weight_deltas(deltas, out / "weight_deltas.csv", run_dir / "plots" / "weight_deltas.png")
    log(f"eval: wrote {out / 'report.json'}, {out / 'report.md'} and plots in {run_dir / 'plots'}")
    return report
