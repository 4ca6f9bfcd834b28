"""`trainer export RUN_DIR --gguf TYPE --check`: every hop of the run, scored the same way, the GGUF ones in
llama.cpp itself (llama-cpp-python), compared with the merged Hugging Face model.

    adapter (base + LoRA, as trained) -> merged (HF folder) -> GGUF f16 -> q8_0 -> TYPE

On the run's test split (val when there is none), for every hop:
- the score: exact match of greedy replies against the references (the task's answers), and perplexity
  over the reference replies (the training labels of each test conversation);
- size on disk.
For each GGUF hop, against the merged model (loaded in float32):
- tokenization: llama.cpp's ids of each rendered prompt and of each whole rendered conversation equal
  the Hugging Face tokenizer's;
- the chat template embedded in the GGUF, rendered the way llama-cpp-python renders it, gives the same
  prompt text as the run's template;
- logits at every position of every test conversation (prompt and reference reply, the training ids):
  top-1 agreement and the largest absolute difference;
- greedy replies through llama-cpp-python's chat completion (the embedded template, llama.cpp's own stop
  tokens) end on an end-of-turn token, not by running to `generation.max_new_tokens`;
- llama.cpp's own prompt and generation speed (tokens/s, `llama_perf_context`).

A hop fails the check when a GGUF tokenizes any text differently, renders any prompt differently, lets any
reply run to the token limit, or (f16/bf16/f32 only) picks a different top-1 token anywhere. The report is
written either way: `RUN_DIR/export/report.json` and `report.md`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import UserError

EXACT_TYPES = ("f32", "f16", "bf16")  # GGUF hops that must pick the same top-1 token everywhere but at near-ties
TIE_MARGIN = 0.05
"""Logits: a position where the merged model's top-1 leads its runner-up by at most this much is a near-tie,
which rounding the weights to 16 bits may flip (on the demo run f16 flipped 3 of 5742 positions, at margins up
to 0.0041, with max |logit diff| 0.089); an exact type must agree at every other position."""


@dataclass
class EvalSet:
    """The run's held-out conversations, as every hop sees them."""

    split: str  # "test" or "val"
    prompts: list[list[dict] | None]  # messages before the reference reply (None for plain-text rows)
    references: list[str | None]
    input_ids: list[list[int]]  # training tokenization of each whole conversation
    labels: list[list[int]]  # -100 where no loss


def load_eval_set(run_dir: Path, recipe, tokenizer) -> EvalSet:
    """The run's test split (val when none) through the project's own data step: its samples (ids and labels,
    unpacked so that each is scored alone, for the losses) and its conversations, one per source row (prompt and
    reference, for the replies)."""
    from trainer.data import prepare_data, unpack
    from trainer.evaluate import conversations, split_for_eval

    data = prepare_data(recipe.data, tokenizer, log=lambda m: None)
    split, rows = split_for_eval(data)
    samples = unpack(rows)
    convs = conversations(recipe, [s["sample_id"] for s in samples], data)
    return EvalSet(
        split,
        [c["prompt"] for c in convs],
        [c["reference"] for c in convs],
        [list(s["input_ids"]) for s in samples],
        [list(s["labels"]) for s in samples],
    )


# ------------------------------------------------------------------------------------------------ scoring
def conversation_loss(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """(sum of next-token cross-entropy over the labelled positions, count). `logits` is [n, vocab] float32
    for the n input ids; label t is predicted at position t-1 (the same shift as training's loss)."""
    targets = np.asarray(labels[1:])
    keep = targets != -100
    if not keep.any():
        return 0.0, 0
    rows = logits[:-1][keep].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    picked = rows[np.arange(len(rows)), targets[keep]]
    return float((log_z - picked).sum()), int(keep.sum())


def _perplexity(loss_sum: float, count: int) -> dict:
    loss = loss_sum / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else float("nan"), "tokens": count}


class LogitsComparison:
    """Running top-1 agreement and |difference| between reference and candidate logits."""

    def __init__(self):
        self.positions = self.agree = 0
        self.max_abs = self.sum_abs = 0.0
        self.n_values = 0
        self.worst_margin = None  # reference's top1-top2 margin at the disagreement with the largest margin
        self.decisive_flips = 0  # disagreements where the reference's margin exceeds TIE_MARGIN

    def add(self, want: np.ndarray, got: np.ndarray) -> None:
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.n_values += diff.size
        want_top, got_top = want.argmax(axis=1), got.argmax(axis=1)
        same = want_top == got_top
        self.positions += len(same)
        self.agree += int(same.sum())
        for i in np.flatnonzero(~same):
            margin = float(want[i, want_top[i]] - want[i, got_top[i]])
            self.worst_margin = margin if self.worst_margin is None else max(self.worst_margin, margin)
            self.decisive_flips += margin > TIE_MARGIN

    def facts(self) -> dict:
        return {
            "positions": self.positions,
            "top1_agree": self.agree,
            "max_abs_logit_diff": self.max_abs,
            "mean_abs_logit_diff": self.sum_abs / self.n_values if self.n_values else float("nan"),
            "largest_margin_flipped": self.worst_margin,
            "top1_flips_outside_ties": self.decisive_flips,
        }


# ------------------------------------------------------------------------------------------------ HF hops
def hf_greedy_replies(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, stop_ids: list[int], batch_size: int = 16
) -> tuple[list[str], int]:
    """Greedy replies of a Hugging Face model that stop on any of `stop_ids` (the run's end-of-turn tokens,
    as llama.cpp and the Modelfile stop), batched with left padding. Returns (replies, how many stopped)."""
    import torch

    from trainer.generate import left_padded, prompt_ids

    device = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p) for p in prompts]  # encoded as training and every generation encodes them
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    replies, stopped = [], 0
    for start in range(0, len(ids), batch_size):
        enc = left_padded(ids[start : start + batch_size], pad, device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in stop_ids]
            stopped += bool(ends)
            replies.append(tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True).strip())
    return replies, stopped


def hf_hop(
    name: str, model, tokenizer, evalset: EvalSet, generation, stop_ids: list[int], path: Path, nbytes: int, log=print
) -> dict:
    """Score a Hugging Face model (adapter or merged) the way every hop is scored."""
    import torch

    from trainer.evaluate import exact_match_rate

    device = next(model.parameters()).device
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(evalset.input_ids, evalset.labels):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
            s, n = conversation_loss(logits, labels)
            loss_sum, count = loss_sum + s, count + n
    hop = {"hop": name, "path": str(path), "bytes": nbytes, **_perplexity(loss_sum, count)}
    usable = [(p, r) for p, r in zip(evalset.prompts, evalset.references) if p]
    if usable:
        started = time.perf_counter()
        replies, stopped = hf_greedy_replies(
            model, tokenizer, [p for p, _ in usable], generation.max_new_tokens, stop_ids
        )
        hop["generate_s"] = round(time.perf_counter() - started, 2)
        hop["exact_match"] = exact_match_rate(replies, [r for _, r in usable])
        hop["exact_match_n"] = len(usable)
        hop["stopped"] = stopped
        hop["replies"] = replies
    log(_hop_line(hop))
    return hop


# ------------------------------------------------------------------------------------------------ GGUF hops
def open_llama(path: Path, n_ctx: int, logits_all: bool):
    """A llama-cpp-python model on `path` using the GGUF's own chat template (never a built-in guess)."""
    from trainer.export.quantize import require_llama_cpp

    require_llama_cpp("--check")
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=os.cpu_count() or 1,
        logits_all=logits_all,
        seed=0,
        verbose=False,
        chat_format="chat_template.default",
    )


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of llama.cpp for `ids` from an empty context (needs logits_all)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def embedded_formatter(llm):
    """The chat formatter llama-cpp-python builds from the GGUF's `tokenizer.chat_template`."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )


def gguf_hops(
    hops: list[tuple[str, Path]], reference, tokenizer, evalset: EvalSet, generation, log=print
) -> list[dict]:
    """Score and compare each GGUF `(name, path)` against the float32 HF `reference` model.

    One pass over the test conversations computes the reference logits once and compares every GGUF with
    them; greedy replies and speed are then measured per file with a fresh llama.cpp context.
    """
    import torch

    from trainer.evaluate import exact_match_rate

    longest = max((len(x) for x in evalset.input_ids), default=1)
    usable = [(p, r) for p, r in zip(evalset.prompts, evalset.references) if p]
    prompt_texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _ in usable]
    full_texts = [
        tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        for p, r in usable
        if r is not None
    ]
    longest_prompt = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts), default=0)
    n_ctx = max(256, longest + 8, longest_prompt + generation.max_new_tokens + 8)

    results = []
    scorers = {}
    for name, path in hops:
        scorers[name] = open_llama(path, n_ctx, logits_all=True)
        results.append({"hop": name, "path": str(path), "bytes": Path(path).stat().st_size})
    compare = {name: LogitsComparison() for name, _ in hops}
    losses = {name: [0.0, 0] for name, _ in hops}
    device = next(reference.parameters()).device
    with torch.no_grad():
        for ids, labels in zip(evalset.input_ids, evalset.labels):
            want = reference(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
            for name, llm in scorers.items():
                got = llama_logits(llm, ids)
                compare[name].add(want, got)
                s, n = conversation_loss(got, labels)
                losses[name][0] += s
                losses[name][1] += n
    for hop in results:
        name = hop["hop"]
        llm = scorers[name]
        texts = prompt_texts + full_texts
        equal = sum(
            llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts
        )
        formatter = embedded_formatter(llm)
        rendered = sum(
            formatter is not None and formatter(messages=p).prompt == text for (p, _), text in zip(usable, prompt_texts)
        )
        hop.update(_perplexity(*losses[name]))
        hop["vs_merged"] = {
            "texts_tokenized_equal": equal,
            "texts": len(texts),
            "prompts_rendered_equal": rendered,
            "prompts": len(usable),
            **compare[name].facts(),
        }
    for llm in scorers.values():
        llm.close()

    for hop in results:
        if usable:
            hop.update(_llama_replies(Path(hop["path"]), n_ctx, usable, generation))
            hop["exact_match"] = exact_match_rate(hop["replies"], [r for _, r in usable])
            hop["exact_match_n"] = len(usable)
        log(_hop_line(hop))
    return results


def _llama_replies(path: Path, n_ctx: int, usable: list, generation) -> dict:
    import llama_cpp

    llm = open_llama(path, n_ctx, logits_all=False)
    replies, stopped, completion_tokens = [], 0, 0
    llama_cpp.llama_perf_context_reset(llm.ctx)
    started = time.perf_counter()
    for prompt, _ in usable:
        out = llm.create_chat_completion(
            messages=prompt,
            max_tokens=generation.max_new_tokens,
            temperature=0.0,
            top_k=1,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
            seed=0,
        )
        choice = out["choices"][0]
        replies.append((choice["message"]["content"] or "").strip())
        stopped += choice["finish_reason"] == "stop"
        completion_tokens += out["usage"]["completion_tokens"]
    wall = time.perf_counter() - started
    perf = llama_cpp.llama_perf_context(llm.ctx)
    llm.close()
    return {
        "replies": replies,
        "stopped": stopped,
        "completion_tokens": completion_tokens,
        "generate_s": round(wall, 2),
        "prompt_tokens_per_s": perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms > 0 else None,
        "generation_tokens_per_s": perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else None,
        "threads": os.cpu_count() or 1,
    }


def failures(report: dict) -> list[str]:
    """One line per failed check (empty: the export passed)."""
    out = []
    for hop in report["hops"]:
        vs = hop.get("vs_merged")
        if vs is None:
            continue
        name = hop["hop"]
        if vs["texts_tokenized_equal"] != vs["texts"]:
            out.append(
                f"{name}: llama.cpp tokenizes {vs['texts'] - vs['texts_tokenized_equal']}/{vs['texts']} texts differently"
            )
        if vs["prompts_rendered_equal"] != vs["prompts"]:
            out.append(
                f"{name}: the embedded chat template renders {vs['prompts'] - vs['prompts_rendered_equal']}/"
                f"{vs['prompts']} prompts differently"
            )
        if hop.get("type") in EXACT_TYPES and vs["top1_flips_outside_ties"]:
            out.append(
                f"{name}: top-1 token differs from the merged model at {vs['top1_flips_outside_ties']}/"
                f"{vs['positions']} positions where the merged model's lead exceeds {TIE_MARGIN} (not a near-tie)"
            )
        if "stopped" in hop and hop["stopped"] != hop["exact_match_n"]:
            out.append(
                f"{name}: {hop['exact_match_n'] - hop['stopped']}/{hop['exact_match_n']} greedy replies ran to max_new_tokens without an end-of-turn token"
            )
    return out


# ------------------------------------------------------------------------------------------------ report
def _hop_line(hop: dict) -> str:
    parts = [f"check: {hop['hop']}: {hop['bytes'] / 2**20:.1f} MiB", f"ppl {hop['perplexity']:.4f}"]
    if "exact_match" in hop:
        parts.append(f"exact match {hop['exact_match']:.3f} (n={hop['exact_match_n']})")
    vs = hop.get("vs_merged")
    if vs:
        parts.append(
            f"tokens equal {vs['texts_tokenized_equal']}/{vs['texts']}, top-1 {vs['top1_agree']}/{vs['positions']}, "
            f"max |logit diff| {vs['max_abs_logit_diff']:.3g}"
        )
    if "stopped" in hop:
        parts.append(f"stopped {hop['stopped']}/{hop['exact_match_n']}")
    if hop.get("generation_tokens_per_s"):
        parts.append(f"{hop['generation_tokens_per_s']:.0f} tok/s")
    return ", ".join(parts)


def report_markdown(report: dict) -> str:
    """The hop table (and the per-GGUF comparison) as Markdown."""
    lines = [
        f"# Export check: {report['run_dir']}",
        "",
        (
            f"Split: {report['split']} ({report['conversations']} conversations); greedy replies, "
            f"max_new_tokens={report['max_new_tokens']}; llama.cpp on {report['threads']} threads."
        ),
        "",
        "| hop | file | size (MiB) | exact match | perplexity | stopped | llama.cpp prompt tok/s | llama.cpp gen tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for hop in report["hops"]:
        em = f"{hop['exact_match']:.3f}" if "exact_match" in hop else "-"
        stopped = f"{hop['stopped']}/{hop['exact_match_n']}" if "stopped" in hop else "-"
        ptps = f"{hop['prompt_tokens_per_s']:.0f}" if hop.get("prompt_tokens_per_s") else "-"
        gtps = f"{hop['generation_tokens_per_s']:.0f}" if hop.get("generation_tokens_per_s") else "-"
        lines.append(
            f"| {hop['hop']} | {Path(hop['path']).name} | {hop['bytes'] / 2**20:.1f} | {em} | "
            f"{hop['perplexity']:.4f} | {stopped} | {ptps} | {gtps} |"
        )
    lines += [
        "",
        "## GGUF vs merged model",
        "",
        "| hop | texts tokenized equal | prompts rendered equal | top-1 agree | max abs logit diff | mean abs logit diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for hop in report["hops"]:
        vs = hop.get("vs_merged")
        if vs:
            lines.append(
                f"| {hop['hop']} | {vs['texts_tokenized_equal']}/{vs['texts']} | "
                f"{vs['prompts_rendered_equal']}/{vs['prompts']} | {vs['top1_agree']}/{vs['positions']} | "
                f"{vs['max_abs_logit_diff']:.4g} | {vs['mean_abs_logit_diff']:.3g} |"
            )
    fallback = [(hop["hop"], f) for hop in report["hops"] for f in hop.get("fallback", [])]
    if fallback:
        lines += ["", "## K-quant fallbacks (rows not a multiple of 256)", ""]
        lines += [f"- {name}: `{f['tensor']}` ({f['columns']} columns) -> {f['type']}" for name, f in fallback]
    lines += ["", f"Result: {'PASS' if not report['failures'] else 'FAIL'}"]
    lines += [f"- {line}" for line in report["failures"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(report_markdown(report))
    return json_path, md_path


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def require_references(evalset: EvalSet) -> None:
    if not evalset.input_ids:
        raise UserError(f"export --check: the run's {evalset.split} split is empty; nothing to compare on.")
