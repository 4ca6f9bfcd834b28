"""trainer vs TRL's SFTTrainer, side by side on this machine: same model, data, LoRA, schedule and precision.

    python bench/vs_trl.py                      # SmolLM2-135M-Instruct from the demo cache, 200 Alpaca rows
    python bench/vs_trl.py --rows 50 --tiny     # a tiny random Llama: checks the harness in a minute
    python bench/vs_trl.py --data launch/data/synthetic_alpaca_1k.json   # without ../shared/data (see --data)
    python bench/vs_trl.py --no-gc              # both tools without gradient checkpointing
    python bench/vs_trl.py --repeat 2           # two interleaved rounds (A B C A B C); the table shows medians

Each tool runs in its own subprocess, one after the other, so wall time and peak RSS are per tool and cover the
whole process (imports, model load, tokenization, training, saving the adapter):

  1. trainer       `python -m trainer train RECIPE` (packing on: its default), with a recipe written here;
  2. trl-default   TRL `SFTTrainer` with its defaults (one sample per row, padded per batch);
  3. trl-packing   the same with `packing=True` (TRL's default strategy: best-fit decreasing, padding-free).

Shared settings: fp32, LoRA r=16 alpha=32 dropout=0.05 on all linear layers, max length 256, batch 8 rows
(micro 8, accumulation 1), AdamW lr 2e-4 cosine, no warmup, one epoch, gradient clipping 1.0, seed 42, gradient
checkpointing on (off with --no-gc), loss on the assistant reply only. TRL gets a conversational
prompt/completion dataset (its completion-only loss), rendered with the same chat template as ours, so the
trained tokens are the same. Caches start cold for both (a fresh TRAINER_CACHE and HF_DATASETS_CACHE per run).

Data: the first --rows rows of an Alpaca-format JSON array (--data; default ../shared/data/alpaca_1k.json, the
first 1000 rows of Stanford Alpaca, which lives beside the checkout and is not part of it: CC BY-NC 4.0). Without it,
pass --data, e.g. the project's own synthetic file launch/data/synthetic_alpaca_1k.json (figures then differ from
the README's, which were measured on Alpaca).

After training, one more subprocess (not timed) measures every run's adapter on the same held-out rows
(the last --eval-rows of the file, never trained on) with the same code: the loss that says whether a faster run
learned as much. Results: bench/results/vs_trl-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_1k.json"
RESULTS = ROOT / "bench" / "results"
TOOLS = ("trainer", "trl-default", "trl-packing")

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
TRAIN = {
    "micro_batch_size": 8,
    "grad_accum": 1,
    "lr": 2e-4,
    "scheduler": "cosine",
    "warmup_steps": 0,
    "epochs": 1,
    "max_grad_norm": 1.0,
    "seed": 42,
}


# ----------------------------------------------------------------------------------------------- inputs
def alpaca_to_messages(row: dict) -> list[dict]:
    """The same rendering as trainer.data.row_to_messages for Alpaca rows (instruction, blank line, input)."""
    from trainer.data import row_to_messages

    return row_to_messages(row, "alpaca", {}, "alpaca")


def write_inputs(work: Path, source: Path, rows: int, eval_rows: int) -> tuple[Path, Path]:
    data = json.loads(source.read_text())
    if rows + eval_rows > len(data):
        raise SystemExit(f"--rows {rows} + --eval-rows {eval_rows} > {len(data)} rows in {source}")
    train, held_out = work / "train.json", work / "heldout.json"
    train.write_text(json.dumps(data[:rows]))
    held_out.write_text(json.dumps(data[len(data) - eval_rows :] if eval_rows else []))
    return train, held_out


def tiny_model(work: Path) -> Path:
    """A tiny random Llama and a tokenizer trained here, as the test suite builds them (tests/conftest.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_model, make_tokenizer

    out = work / "tiny-llama"
    tok = make_tokenizer()
    make_model(len(tok), init_std=0.2).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- running
def run_measured(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run `cmd` to completion; whole-process wall time, peak RSS (this child only) and the load around it."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "process_wall_s": round(wall, 2),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
        "cpu_user_s": round(usage.ru_utime, 1),
        "cpu_sys_s": round(usage.ru_stime, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def child_env(work: Path, name: str) -> dict:
    env = dict(os.environ)
    env["TRAINER_CACHE"] = str(work / f"cache-{name}")  # cold tokenized-data cache
    env["HF_DATASETS_CACHE"] = str(work / f"hf-datasets-{name}")  # cold `datasets` cache
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def trainer_recipe(args, model: Path, train_json: Path, out: Path) -> dict:
    return {
        "model": {
            "name_or_path": str(model),
            "dtype": args.dtype,
            "gradient_checkpointing": args.gc,
            "attn_implementation": "sdpa",
        },
        "lora": dict(LORA),
        "data": {
            "path": str(train_json),
            "max_seq_len": args.max_len,
            "packing": True,
            "val_fraction": 0.0,
            "train_on": "completion",
        },
        "train": {**TRAIN, "log_every": 1, "eval_every": 10**9, "save_every": 10**9, "keep_last": 1},
        "output_dir": str(out),
    }


def run_trainer(args, model: Path, train_json: Path, work: Path, tag: str) -> dict:
    import yaml

    out = work / f"run-{tag}"
    recipe = work / f"recipe-{tag}.yaml"
    recipe.write_text(yaml.safe_dump(trainer_recipe(args, model, train_json, out), sort_keys=False))
    cmd = [sys.executable, "-m", "trainer", "train", str(recipe), "--no-progress", *args.trainer_override]
    res = run_measured(cmd, child_env(work, tag), work / f"{tag}.log", args.timeout)
    if res["rc"] != 0:
        return {**res, "error": tail(work / f"{tag}.log")}
    summary = json.loads((out / "run_summary.json").read_text())
    tokens, slots, losses = 0, 0, []
    from trainer.tracking import read_metrics

    prev = 0
    for row in read_metrics(out / "metrics.csv"):
        if not row.get("loss"):
            continue
        seen = int(float(row["tokens_seen"]))
        window = seen - prev
        prev = seen
        tokens += window
        slots += window / max(1e-9, 1 - float(row["padding_frac"]))
        losses.append(float(row["loss"]))
    return {
        **res,
        "train_s": summary["train_wall_s"],
        "model_load_s": summary.get("model_load_s"),
        "data_prepare_s": summary.get("data_prepare_s"),
        "steps": summary["steps"],
        "real_tokens": summary["tokens_seen"],
        "target_tokens": summary["target_tokens_seen"],
        "padding_frac": 1 - tokens / slots if slots else None,
        "losses": losses,
        "final_loss": summary["final_loss"],
        "adapter": str(out / "adapter"),
        "tflops": summary.get("tflops"),
        "mfu": summary.get("mfu"),
        "mfu_peak": summary.get("mfu_peak"),
        "flops_per_token": summary.get("model_flops_per_token"),
        "peak_gpu_gib": summary["peak_mem_gib"] if summary.get("device", "cpu").startswith("cuda") else None,
    }


def run_trl(args, model: Path, train_json: Path, work: Path, tag: str, packing: bool) -> dict:
    out = work / f"run-{tag}"
    cfg = {
        "model": str(model),
        "data": str(train_json),
        "packing": packing,
        "gc": args.gc,
        "max_len": args.max_len,
        "out": str(out),
        "dtype": args.dtype,
    }
    cfg_path = work / f"{tag}.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", str(cfg_path)]
    res = run_measured(cmd, child_env(work, tag), work / f"{tag}.log", args.timeout)
    if res["rc"] != 0:
        return {**res, "error": tail(work / f"{tag}.log")}
    return {**res, **json.loads((out / "bench_result.json").read_text()), "adapter": str(out / "adapter")}


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:]


# ----------------------------------------------------------------------------------------------- TRL worker
def trl_worker(cfg_path: str) -> None:
    """One TRL SFTTrainer run, in its own process; writes OUT/bench_result.json."""
    cfg = json.loads(Path(cfg_path).read_text())
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = Path(cfg["out"])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
    model_load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = []
    for r in json.loads(Path(cfg["data"]).read_text()):
        msgs = alpaca_to_messages(r)
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    sft = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=TRAIN["micro_batch_size"],
        gradient_accumulation_steps=TRAIN["grad_accum"],
        learning_rate=TRAIN["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=TRAIN["warmup_steps"],
        num_train_epochs=TRAIN["epochs"],
        max_grad_norm=TRAIN["max_grad_norm"],
        seed=TRAIN["seed"],
        max_length=cfg["max_len"],
        packing=cfg["packing"],
        gradient_checkpointing=cfg["gc"],
        bf16=cfg["dtype"] == "bf16",
        fp16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    data_prepare_s = time.perf_counter() - t0  # tokenization, packing and the LoRA wrap: all inside SFTTrainer()

    counts = {"real": 0, "slots": 0, "targets": 0, "batches": 0}
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        ids = batch["input_ids"]
        counts["slots"] += ids.numel()
        counts["real"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        counts["targets"] += int((batch["labels"][:, 1:] != -100).sum())
        counts["batches"] += 1
        return batch

    trainer.data_collator = counting_collator
    result = trainer.train()
    trainer.save_model(str(out / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_result.json").write_text(
        json.dumps(
            {
                "train_s": round(result.metrics["train_runtime"], 3),
                "model_load_s": round(model_load_s, 3),
                "data_prepare_s": round(data_prepare_s, 3),
                "steps": trainer.state.global_step,
                "real_tokens": counts["real"],
                "target_tokens": counts["targets"],
                "padding_frac": 1 - counts["real"] / counts["slots"] if counts["slots"] else None,
                "losses": losses,
                "final_loss": losses[-1] if losses else None,
                "train_loss_mean": result.metrics.get("train_loss"),
                "in_process_s": round(time.perf_counter() - t_start, 3),
                "trl_packing_strategy": sft.packing_strategy if cfg["packing"] else None,
                "padding_free": bool(getattr(trainer, "padding_free", False)),
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            },
            indent=1,
        )
    )


# ----------------------------------------------------------------------------------------------- held-out eval
def eval_worker(cfg_path: str) -> None:
    """Base model and every adapter on the same held-out rows, with the same code (trainer.evaluate)."""
    cfg = json.loads(Path(cfg_path).read_text())
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.config import DataArgs
    from trainer.data import prepare_data
    from trainer.loss import dataset_loss
    from trainer.tokenizer import run_tokenizer

    tok = run_tokenizer(cfg["model"])
    data = prepare_data(
        DataArgs(path=cfg["data"], max_seq_len=cfg["max_len"], packing=False, val_fraction=0.0),
        tok,
        cache_root=Path(cfg["cache"]),
        log=lambda m: None,
    )
    out = {}
    for name, adapter in [("base", None), *cfg["adapters"].items()]:
        model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        ev = dataset_loss(model.eval(), data.train, batch_size=8, pad_id=tok.pad_token_id, device="cpu")
        out[name] = {"heldout_loss": round(ev["loss"], 5), "heldout_tokens": ev["tokens"]}
        print(name, out[name], flush=True)
    Path(cfg["result"]).write_text(json.dumps(out, indent=1))


def run_eval(args, model: Path, held_out: Path, work: Path, adapters: dict) -> dict:
    cfg = {
        "model": str(model),
        "data": str(held_out),
        "max_len": args.max_len,
        "adapters": adapters,
        "cache": str(work / "cache-eval"),
        "result": str(work / "eval.json"),
    }
    (work / "eval-cfg.json").write_text(json.dumps(cfg))
    res = run_measured(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "eval", str(work / "eval-cfg.json")],
        child_env(work, "eval"),
        work / "eval.log",
        args.timeout,
    )
    if res["rc"] != 0:
        print(f"held-out eval failed:\n{tail(work / 'eval.log')}", file=sys.stderr)
        return {}
    return json.loads((work / "eval.json").read_text())


# ----------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
                info["bf16_native"] = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        pass
    return info


def median_run(runs: list[dict]) -> dict:
    """Per-field median over repeated runs of one tool (the first run's non-numeric fields)."""
    ok = [r for r in runs if r.get("rc") == 0]
    if not ok:
        return runs[-1]
    out = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
    out["repeats"] = len(ok)
    out["process_wall_s_all"] = [r["process_wall_s"] for r in ok]
    return out


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def add_model_flops(results: dict) -> None:
    """Model TFLOP/s (and MFU) of every tool from trainer's FLOPs per token: same model, LoRA and samples, so the
    same model FLOPs per real token (trainer/flops.py); only the seconds differ. MFU where trainer knew the peak."""
    ours = results.get("trainer", {})
    per_token = ours.get("flops_per_token")
    if not per_token:
        return
    peak_tflops = ours["tflops"] / ours["mfu"] if ours.get("mfu") and ours.get("tflops") else None
    for r in results.values():
        if r.get("rc") == 0 and r.get("train_s"):
            r["tflops"] = per_token * r["real_tokens"] / r["train_s"] / 1e12
            r["mfu"] = r["tflops"] / peak_tflops if peak_tflops else None


def table(results: dict, evals: dict) -> str:
    gpu = any(r.get("peak_gpu_gib") for r in results.values())
    head = (
        "| tool | whole process s | training s | model load s | data prep s | steps | real tok/s | padding | "
        "peak RSS GiB | " + ("peak GPU GiB | " if gpu else "") + "model TFLOP/s | MFU | final train loss | "
        "held-out loss | load (1-min) |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in results.items():
        if r.get("rc") != 0:
            lines.append(f"| {name} | failed (rc {r.get('rc')}) |" + " |" * (head.count("|") - 3))
            continue
        tps = r["real_tokens"] / r["train_s"] if r.get("train_s") else None
        load = f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"
        lines.append(
            f"| {name} | {fmt(r['process_wall_s'])} | {fmt(r['train_s'])} | {fmt(r.get('model_load_s'))} | "
            f"{fmt(r.get('data_prepare_s'))} | {r['steps']} | {fmt(tps)} | "
            f"{fmt(100 * r['padding_frac'] if r.get('padding_frac') is not None else None)}% | "
            f"{fmt(r['peak_rss_gib'], 2)} | "
            + (f"{fmt(r.get('peak_gpu_gib'), 2)} | " if gpu else "")
            + f"{fmt(r.get('tflops'), 3)} | {fmt(100 * r['mfu'] if r.get('mfu') else None)}{'%' if r.get('mfu') else ''} | "
            f"{fmt(r.get('final_loss'), 4)} | "
            f"{fmt(evals.get(name, {}).get('heldout_loss'), 4)} | {load} |"
        )
    if "base" in evals:
        lines.append(
            f"\nBase model before training, same held-out rows: loss {evals['base']['heldout_loss']:.4f} "
            f"({evals['base']['heldout_tokens']} target tokens)."
        )
    return "\n".join(lines)


def ratios(results: dict) -> dict:
    ours = results.get("trainer")
    out = {}
    if not ours or ours.get("rc") != 0:
        return out
    for name, r in results.items():
        if name == "trainer" or r.get("rc") != 0:
            continue
        out[name] = {
            "whole_process_speedup": round(r["process_wall_s"] / ours["process_wall_s"], 3),
            "training_speedup": round(r["train_s"] / ours["train_s"], 3),
            "real_tokens_per_s_ratio": round(
                (ours["real_tokens"] / ours["train_s"]) / (r["real_tokens"] / r["train_s"]), 3
            ),
            "peak_rss_ratio": round(ours["peak_rss_gib"] / r["peak_rss_gib"], 3),
        }
    return out


def ratio_table(rat: dict) -> str:
    lines = [
        "| trainer vs | whole process (x faster) | training (x faster) | real tok/s (x) | peak RSS (ours/theirs) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rat.items():
        lines.append(
            f"| {name} | {r['whole_process_speedup']:.2f} | {r['training_speedup']:.2f} | "
            f"{r['real_tokens_per_s_ratio']:.2f} | {r['peak_rss_ratio']:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct from the demo cache)")
    p.add_argument(
        "--data",
        type=Path,
        default=ALPACA,
        help="Alpaca-format JSON array to train and score on (default ../shared/data/alpaca_1k.json, "
        "beside the checkout; launch/data/synthetic_alpaca_1k.json is the project's own)",
    )
    p.add_argument("--rows", type=int, default=200, help="first N rows of --data to train on (default 200)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + locally trained tokenizer")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument("--no-gc", dest="gc", action="store_false", help="gradient checkpointing off for every tool")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="precision for every tool (default fp32)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=48, help="held-out rows (the file's last N) to score; 0: skip")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the table shows per-tool medians")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs, adapters)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument(
        "--trainer-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for the trainer run only (for lever measurements)",
    )
    p.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        kind, cfg = args.worker
        {"trl": trl_worker, "eval": eval_worker}[kind](cfg)
        return 0
    if not args.data.is_file():
        raise SystemExit(
            f"bench/vs_trl.py: data file {args.data} not found; pass --data PATH (an Alpaca-format JSON "
            "array), e.g. --data launch/data/synthetic_alpaca_1k.json"
        )
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"--tools: unknown {sorted(unknown)}; choose from {TOOLS}")
    if any(t.startswith("trl") for t in tools):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or pip install trl)") from None
    work = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    try:
        if args.tiny:
            model = tiny_model(work)
        elif args.model:
            model = Path(args.model).expanduser()
        else:
            from trainer.demo_model import ensure_smollm2

            model = ensure_smollm2()
        train_json, held_out = write_inputs(work, args.data, args.rows, args.eval_rows)
        info = machine()
        print(
            f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
            f", load {os.getloadavg()[0]:.2f}; model {model}; {args.rows} rows; work folder {work}",
            flush=True,
        )
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for round_ in range(args.repeat):
            for tool in tools:
                tag = f"{tool}-{round_}"
                print(f"[{time.strftime('%H:%M:%S')}] {tag}: running (load {os.getloadavg()[0]:.2f}) ...", flush=True)
                if tool == "trainer":
                    r = run_trainer(args, model, train_json, work, tag)
                else:
                    r = run_trl(args, model, train_json, work, tag, packing=tool == "trl-packing")
                runs[tool].append(r)
                msg = (
                    f"whole process {r['process_wall_s']:.1f} s, training {r['train_s']:.1f} s, "
                    f"final loss {r['final_loss']:.4f}"
                    if r["rc"] == 0
                    else f"FAILED rc={r['rc']}\n{r['error']}"
                )
                print(f"[{time.strftime('%H:%M:%S')}] {tag}: {msg}", flush=True)
        results = {t: median_run(rs) for t, rs in runs.items()}
        evals = {}
        if args.eval_rows:
            adapters = {t: r["adapter"] for t, r in results.items() if r.get("rc") == 0}
            print(f"[{time.strftime('%H:%M:%S')}] held-out eval of {list(adapters)} ...", flush=True)
            evals = run_eval(args, model, held_out, work, adapters)
        add_model_flops(results)
        rat = ratios(results)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {
            "data": str(args.data),
            "rows": args.rows,
            "tiny": args.tiny,
            "model": str(model),
            "max_len": args.max_len,
            "gradient_checkpointing": args.gc,
            "dtype": args.dtype,
            "lora": LORA,
            "train": TRAIN,
            "repeat": args.repeat,
            "eval_rows": args.eval_rows,
            "trainer_override": args.trainer_override,
        }
        payload = {
            "settings": settings,
            "machine": info,
            "results": results,
            "runs": runs,
            "heldout": evals,
            "ratios": rat,
        }
        (out / f"vs_trl-{stamp}.json").write_text(json.dumps(payload, indent=1, default=str))
        md = report_md(settings, info, results, evals, rat)
        (out / f"vs_trl-{stamp}.md").write_text(md)
        print("\n" + md)
        print(f"written: {out / f'vs_trl-{stamp}.json'} and .md")
        return 0 if all(r.get("rc") == 0 for r in results.values()) else 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report_md(settings, info, results, evals, rat) -> str:
    gc = "on" if settings["gradient_checkpointing"] else "off"
    model = "tiny random Llama" if settings["tiny"] else Path(settings["model"]).name
    return "\n".join(
        [
            f"# trainer vs TRL SFTTrainer ({time.strftime('%Y-%m-%d %H:%M')})",
            "",
            f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
            f"transformers {info['transformers']}, peft {info['peft']}, accelerate {info['accelerate']}, "
            f"TRL {info['trl']}. Load (1-min average) before -> after each run in the last column.",
            "",
            f"Run: {model}, first {settings['rows']} rows of {Path(settings['data']).name}, "
            f"max length {settings['max_len']}, {settings['dtype']}, "
            f"LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} all-linear, batch 8 (micro 8 x accum 1),"
            f" lr 2e-4 cosine, no warmup, 1 epoch, gradient checkpointing {gc}, loss on replies only"
            + (f", median of {settings['repeat']} interleaved rounds" if settings["repeat"] > 1 else "")
            + (f"; trainer overrides {settings['trainer_override']}" if settings["trainer_override"] else "")
            + ".",
            "",
            table(results, evals),
            "",
            ratio_table(rat),
            "",
            "whole process: from launch to exit (imports, model load, tokenization, training, saving the adapter); "
            "training: the tools' own training-loop time; real tok/s: non-padding tokens per training second; "
            "padding: share of the batch slots that were padding (TRL packing is padding-free: one flattened row per "
            "batch); final train loss: the last step's loss; held-out loss: every adapter scored by the same code on "
            f"the same {settings['eval_rows']} held-out rows (not trained on).",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
