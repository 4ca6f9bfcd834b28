"""`trainer eval RUN_DIR`: base vs tuned on the run's test split: perplexity, exact match (one normaliser),
sample generations, LoRA weight deltas; `eval/report.{json,md}` and plots."""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import replace
from pathlib import Path

from trainer.artifacts import Tuned, read_recipe, tokenizer_of, tuned_source
from trainer.dtypes import torch_dtype
from trainer.errors import UserError
from trainer.generate import generate
from trainer.loss import dataset_loss
from trainer.plots import plot_metrics, plot_weight_deltas
from trainer.run_dir import RunDir
from trainer.tracking import read_metrics


# ----------------------------------------------------------------------------------------------- run report
def split_for_eval(data):
    """(name, rows): the test split, else val."""
    if data.test is not None:
        return "test", data.test
    if data.val is not None:
        return "val", data.val
    raise UserError("the run has neither a test nor a val split (data.test_fraction and data.val_fraction are 0)")


def conversations(recipe, sample_ids: list[int], data) -> list[dict]:
    """Prompt messages (everything before the last assistant turn, as the template receives them) and the
    reference reply, one per source row (a row that gave several samples counts once), by sample id."""
    from trainer.data import prepare_messages, sample_conversations

    firsts = list({src: sid for sid, src in reversed(list(zip(sample_ids, data.sources(sample_ids))))}.values())
    firsts.reverse()
    out = []
    for sid, msgs in zip(firsts, sample_conversations(recipe.data, data, firsts)):
        if isinstance(msgs, str):
            out.append({"id": sid, "prompt": None, "reference": None})
            continue
        msgs = prepare_messages(msgs, recipe.data)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"id": sid, "prompt": msgs[:last], "reference": msgs[last]["content"]})
    return out


_TRAILING_PUNCTUATION = ".!?,;:"


def normalize_answer(text: str) -> str:
    """The one exact-match normaliser: whitespace runs collapsed to one space, surrounding whitespace and trailing
    punctuation (.!?,;:) removed; case and everything else kept (`2024-03-05.` == ` 2024-03-05`)."""
    return " ".join(text.split()).rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether a reply equals the reference after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """Share of replies that `exact_match` their reference (0.0 for no references)."""
    hits = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def evaluate_models(
    models: dict, tokenizer, rows, convs: list[dict], recipe, *, exact_match: bool, num_samples: int, log=print
) -> dict:
    """Perplexity for each model on `rows`; exact match over `convs` (greedy) when asked; sample generations.

    `models` maps a name ("base", "tuned") to a callable context manager yielding the model, so one loaded
    PEFT model can serve as base (adapter disabled) and tuned.
    """
    gen = recipe.generation
    report, samples = (
        {},
        [
            {"id": c["id"], "prompt": c["prompt"][-1]["content"] if c["prompt"] else None, "reference": c["reference"]}
            for c in convs[:num_samples]
        ],
    )
    usable = [c for c in convs if c["prompt"]]
    for name, use in models.items():
        with use() as model:
            device = next(model.parameters()).device
            ppl = dataset_loss(
                model, rows, batch_size=recipe.train.eval_batch_size, pad_id=tokenizer.pad_token_id, device=device
            )
            entry = {
                "loss": ppl["loss"],
                "perplexity": ppl["ppl"],
                "token_accuracy": ppl["token_accuracy"],
                "tokens": ppl["tokens"],
            }
            targets = usable if exact_match else usable[:num_samples]
            greedy = generate(model, tokenizer, [c["prompt"] for c in targets], max_new_tokens=gen.max_new_tokens)
            if exact_match:
                entry["exact_match"] = exact_match_rate(greedy, [c["reference"] for c in targets])
                entry["exact_match_n"] = len(targets)
            sampled = generate(
                model,
                tokenizer,
                [c["prompt"] for c in usable[:num_samples]],
                do_sample=True,
                temperature=gen.temperature,
                top_p=gen.top_p,
                max_new_tokens=gen.max_new_tokens,
            )
            for s, g, smp in zip(samples, greedy, sampled):
                s[f"{name}_greedy"], s[f"{name}_sampled"] = g, smp
            report[name] = entry
            log(
                f"eval: {name}: loss {entry['loss']:.4f} ppl {entry['perplexity']:.3f} "
                f"token accuracy {entry['token_accuracy']:.3f}"
                + (f" exact match {entry['exact_match']:.3f} (n={len(targets)})" if exact_match else "")
            )
    report["samples"] = samples
    return report


def report_markdown(report: dict) -> str:
    names = [n for n in ("base", "tuned") if n in report]
    lines = [
        "# Evaluation",
        "",
        f"Split: {report.get('split', '?')}",
        "",
        "| model | exact match | perplexity | loss | token accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in names:
        e = report[n]
        em = f"{e['exact_match']:.3f}" if "exact_match" in e else "-"
        acc = f"{e['token_accuracy']:.3f}" if "token_accuracy" in e else "-"
        lines.append(f"| {n} | {em} | {e['perplexity']:.3f} | {e['loss']:.4f} | {acc} |")
    lines += ["", "## Samples", ""]
    for s in report["samples"]:
        lines += [f"### sample {s['id']}", "", f"**prompt:** {s['prompt']}", "", f"**reference:** {s['reference']}", ""]
        for n in names:
            lines += [
                f"**{n} (greedy):** {s.get(n + '_greedy', '')}",
                "",
                f"**{n} (sampled):** {s.get(n + '_sampled', '')}",
                "",
            ]
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
            rows.append(
                {
                    "module": name.replace("base_model.model.", ""),
                    "layer": layer,
                    "type": name.split(".")[-1],
                    "delta_norm": norm,
                    "weight_norm": base_norm,
                    "relative": norm / base_norm if base_norm else float("nan"),
                }
            )
    return rows


def _models_to_compare(run: RunDir, recipe, merged: bool, device: str, vocab_size: int, source: Tuned | None = None):
    """({"base": ctx, "tuned": ctx}, LoRA weight-delta rows): each value a callable returning a context manager
    that yields the model, so one loaded PEFT model serves as base (adapter disabled) and tuned. `source`: the
    trained weights (`artifacts.tuned_source`); `merged`: RUN_DIR/merged instead, when it exists and verifies."""
    from trainer.model import load_base, load_tuned

    dtype = torch_dtype(recipe.model.dtype)
    tuned_folder = None
    if merged and recipe.lora is not None and run.merged.is_dir():
        from trainer.artifacts import merged_source

        tuned_folder, source = merged_source(run.root, log=lambda m: None)  # source: when merged/ is not complete
    if tuned_folder is None:
        source = source or tuned_source(run.root)
        tuned_folder = source.model
    if tuned_folder is not None:
        base = load_base(recipe.model, dtype=dtype, quantize=False, device_map={"": device}, vocab_size=vocab_size)
        base = base.eval()
        tuned = load_base(
            replace(recipe.model, name_or_path=str(tuned_folder)), dtype=dtype, quantize=False, device_map={"": device}
        ).eval()
        return {"base": lambda: contextlib.nullcontext(base), "tuned": lambda: contextlib.nullcontext(tuned)}, []
    peft_model = load_tuned(recipe, source.adapter, device_map={"": device}, vocab_size=vocab_size)

    @contextlib.contextmanager
    def base_ctx():
        with peft_model.disable_adapter():
            yield peft_model

    return {"base": base_ctx, "tuned": lambda: contextlib.nullcontext(peft_model)}, lora_weight_deltas(peft_model)


def write_weight_deltas_csv(rows: list[dict], csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["module", "layer", "type", "delta_norm", "weight_norm", "relative"])
        w.writeheader()
        w.writerows(rows)


def eval_run(
    run_dir: Path, *, exact_match: bool = False, merged: bool = False, log=print, source: Tuned | None = None
) -> dict:
    """`trainer eval RUN_DIR`: base vs tuned on the run's test split (val when none); report files and plots.
    `source`: the trained weights to evaluate (`artifacts.tuned_source`; default: the final ones)."""
    from trainer.data import prepare_data
    from trainer.model import default_device

    run = RunDir(run_dir)
    recipe = read_recipe(run)
    tokenizer = tokenizer_of(run, recipe)
    data = prepare_data(recipe.data, tokenizer, log=lambda m: None)
    split, rows = split_for_eval(data)
    convs = conversations(recipe, [s for r in rows["sample_ids"] for s in r], data)
    models, deltas = _models_to_compare(run, recipe, merged, default_device(), len(tokenizer), source)
    report = {
        "split": split,
        **evaluate_models(
            models,
            tokenizer,
            rows,
            convs,
            recipe,
            exact_match=exact_match,
            num_samples=recipe.generation.num_samples,
            log=log,
        ),
    }
    run.eval.mkdir(parents=True, exist_ok=True)
    run.eval_report.write_text(json.dumps(report, indent=1))
    (run.eval / "report.md").write_text(report_markdown(report))
    if run.metrics.exists():
        plot_metrics(read_metrics(run.metrics), run.plots, run.root.name)
    if deltas:
        write_weight_deltas_csv(deltas, run.eval / "weight_deltas.csv")
        plot_weight_deltas(deltas, run.plots / "weight_deltas.png")
    log(f"eval: wrote {run.eval_report}, {run.eval / 'report.md'} and plots in {run.plots}")
    return report
