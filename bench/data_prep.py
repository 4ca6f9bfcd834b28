"""Data preparation at scale: `prepare_data` on N generated chat (or short raw-text) rows against a bare batched render + tokenize of
the same rows, in the same run.

    python bench/data_prep.py --rows 10000 100000 1000000 [--tokenizer DIR] [--num-proc N] [--work DIR]

For each N: writes N multi-turn chat rows (JSON Lines, seeded; optional system turn, 1-3 user/assistant turns),
then runs, each in a fresh process so its peak memory is its own:
- `prepare`: `trainer.data.prepare_data` with an empty cache (read, tokenize in `num_proc` processes, split,
  pack, write Arrow): seconds, rows/s, tokens/s, peak RSS of the main process and of the largest worker;
- `bare`: read the lines, `json.loads`, `apply_chat_template(batch, tokenize=False)` and one batched tokenizer
  call per 1,000 rows, nothing kept: the floor any data step pays for rendering and tokenizing.
The ratio is prepare / bare seconds. Goals (2 cores): ratio <= 1.5, peak RSS < 3 GiB at 1M rows, time linear in N.

The tokenizer: SmolLM2-135M-Instruct's from `trainer demo`'s cache (built offline by
`trainer.demo_model.ensure_smollm2`), else the tests' tokenizer (trained on the spot). Prints a markdown table and
writes it, with the raw figures, to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but "
    "not what all were we when your can said there use an each which she do how their if will up other about out "
    "many then them these so some her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did get come made may part model "
    "data train token answer question explain because example result value python function list file error"
).split()


def generate(path: Path, rows: int, seed: int = 0, layout: str = "chat") -> None:
    """N chat rows: a system turn in one row of three, 1-3 user/assistant turns of 5-40 and 12-72 words.
    `layout="text"`: N raw-text rows of 5-40 words (one tokenizer call each: what is left is the pipeline)."""
    rnd = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(n)).capitalize() + "."

    with path.open("w") as fh:
        for i in range(rows):
            if layout == "text":
                fh.write(json.dumps({"text": sentence(rnd.randint(5, 40))}) + "\n")
                continue
            msgs = [{"role": "system", "content": sentence(8)}] if i % 3 == 0 else []
            for _ in range(rnd.randint(1, 3)):
                msgs.append({"role": "user", "content": sentence(rnd.randint(5, 40))})
                msgs.append({"role": "assistant", "content": " ".join(sentence(12) for _ in range(rnd.randint(1, 6)))})
            fh.write(json.dumps({"messages": msgs}) + "\n")


def tokenizer_path(work: Path) -> str:
    smol = Path.home() / ".cache" / "trainer" / "models" / "SmolLM2-135M-Instruct"
    if (smol / "tokenizer.json").exists():
        return str(smol)
    try:
        from trainer.demo_model import ensure_smollm2

        return str(ensure_smollm2())
    except Exception:  # no demo cache and it cannot be built: the tests' tokenizer
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_tokenizer

        out = work / "test-tokenizer"
        if not out.exists():
            make_tokenizer().save_pretrained(out)
        return str(out)


def peak_rss_gib() -> tuple[float, float]:
    """(this process, its largest waited-for child) peak resident memory in GiB (ru_maxrss is KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return own, children


def worker_prepare(data: Path, tok_dir: str, cache: Path, num_proc: int | None, max_seq_len: int) -> dict:
    from trainer.config import DataArgs
    from trainer.data import prepare_data
    from trainer.tokenizer import run_tokenizer

    tok = run_tokenizer(tok_dir)
    cfg = DataArgs(path=str(data), max_seq_len=max_seq_len, val_fraction=0.001, num_proc=num_proc)
    t0 = time.perf_counter()
    prepared = prepare_data(cfg, tok, cache_root=cache, log=lambda m: None)
    seconds = time.perf_counter() - t0
    s = prepared.stats
    tokens = sum(s[k]["tokens"] for k in ("train", "val", "test") if k in s and "tokens" in s[k])
    own, child = peak_rss_gib()
    return {
        "seconds": seconds,
        "tokens": tokens,
        "train_rows": s["train"]["rows"],
        "pack_fill": s["train"]["pack_fill"],
        "rss_main_gib": own,
        "rss_worker_gib": child,
    }


def worker_bare(data: Path, tok_dir: str, batch: int = 1000) -> dict:
    from trainer.tokenizer import run_tokenizer

    tok = run_tokenizer(tok_dir)
    t0 = time.perf_counter()
    tokens = 0
    with data.open() as fh:
        while True:
            lines = [ln for _, ln in zip(range(batch), fh)]
            if not lines:
                break
            rows = [json.loads(ln) for ln in lines]
            if "text" in rows[0]:
                texts = [r["text"] + tok.eos_token for r in rows]
            else:
                texts = tok.apply_chat_template([r["messages"] for r in rows], tokenize=False)
            tokens += sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - t0
    own, _ = peak_rss_gib()
    return {"seconds": seconds, "tokens": tokens, "rss_main_gib": own}


def worker_samples(data: Path, tok_dir: str, max_seq_len: int) -> dict:
    """The per-conversation work alone, in one process: parse, row -> messages, tokenize_sample (the data step's
    driver calls the same), nothing written: prepare_data with num_proc=1 minus this is the pipeline's own cost."""
    from trainer.config import DataArgs
    from trainer.data.formats import row_to_messages
    from trainer.data.pipeline import tokenize_conversation
    from trainer.tokenizer import run_tokenizer

    tok = run_tokenizer(tok_dir)
    cfg = DataArgs(path=str(data), max_seq_len=max_seq_len)
    t0 = time.perf_counter()
    tokens = 0
    with data.open() as fh:
        for line in fh:
            for ids, _ in tokenize_conversation(tok, row_to_messages(json.loads(line), "messages"), cfg):
                tokens += min(len(ids), max_seq_len)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "rss_main_gib": peak_rss_gib()[0]}


def run_worker(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--tokenizer", help="tokenizer folder (default: SmolLM2's from the demo cache)")
    p.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: one per core)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-data"))
    p.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    p.add_argument("--layout", choices=["chat", "text"], default="chat", help="text: short raw-text rows")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="instead: at each N, prepare_data with num_proc=1 against the per-conversation work alone (one process)",
    )
    p.add_argument("--worker", choices=["prepare", "bare", "samples"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "prepare":
        print(json.dumps(worker_prepare(Path(a.data), a.tokenizer, Path(a.cache), a.num_proc, a.max_seq_len)))
        return
    if a.worker == "bare":
        print(json.dumps(worker_bare(Path(a.data), a.tokenizer)))
        return
    if a.worker == "samples":
        print(json.dumps(worker_samples(Path(a.data), a.tokenizer, a.max_seq_len)))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = a.tokenizer or tokenizer_path(work)
    results = []
    print(f"{a.layout} rows; tokenizer {tok_dir}; {os.cpu_count()} cores; num_proc {a.num_proc or 'auto'}", flush=True)
    for n in a.rows:
        data = work / f"{a.layout}_{n}.jsonl"
        if not data.exists():
            generate(data, n, layout=a.layout)
        cache = work / f"cache_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        common = ["--tokenizer", tok_dir, "--data", str(data), "--max-seq-len", str(a.max_seq_len)]
        if a.overhead:
            prep = run_worker(["--worker", "prepare", *common, "--cache", str(cache), "--num-proc", "1"])
            alone = run_worker(["--worker", "samples", *common])
            row = {
                "rows": n,
                "prepare_1proc_s": round(prep["seconds"], 1),
                "per_conversation_s": round(alone["seconds"], 1),
                "pipeline_overhead": round(prep["seconds"] / alone["seconds"] - 1, 3),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            continue
        extra = ["--num-proc", str(a.num_proc)] if a.num_proc else []
        prep = run_worker(["--worker", "prepare", *common, "--cache", str(cache), *extra])
        bare = run_worker(["--worker", "bare", *common])
        row = {
            "rows": n,
            "prepare_s": round(prep["seconds"], 1),
            "rows_per_s": round(n / prep["seconds"]),
            "tokens_per_s": round(prep["tokens"] / prep["seconds"]),
            "tokens": prep["tokens"],
            "peak_rss_main_gib": round(prep["rss_main_gib"], 2),
            "peak_rss_worker_gib": round(prep["rss_worker_gib"], 2),
            "bare_s": round(bare["seconds"], 1),
            "bare_rss_gib": round(bare["rss_main_gib"], 2),
            "ratio": round(prep["seconds"] / bare["seconds"], 2),
            "pack_fill": prep["pack_fill"],
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        if not a.keep:
            shutil.rmtree(cache, ignore_errors=True)
    if a.overhead:
        (work / "overhead.json").write_text(json.dumps(results, indent=1))
        return
    table = [
        "| rows | tokens | prepare_data s | rows/s | tokens/s | peak RSS main / worker GiB | bare render+tokenize s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        table.append(
            f"| {r['rows']:,} | {r['tokens']:,} | {r['prepare_s']} | {r['rows_per_s']:,} | {r['tokens_per_s']:,} | "
            f"{r['peak_rss_main_gib']} / {r['peak_rss_worker_gib']} | {r['bare_s']} | {r['ratio']} |"
        )
    print("\n".join(table))
    (work / "results.json").write_text(json.dumps({"tokenizer": tok_dir, "results": results}, indent=1))


if __name__ == "__main__":
    main()
