"""Shared fixtures and helpers: test data generated here, a tiny random Llama, a byte-level BPE tokenizer trained here
in under a second, and the ways tests run the CLI in subprocesses.

Nothing is downloaded and nothing is read from outside the checkout: the data is made by tests/datagen.py (seeded,
written by this project) and written into a temporary folder when pytest starts. The tokenizer mimics SmolLM2's:
ChatML template, pad == eos == <|im_end|>.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from tests import datagen

ROOT = Path(__file__).resolve().parents[1]
# torch threads in the test process and in single-process CLI runs: OMP_NUM_THREADS if set, else 1. The models here
# are tiny (64-d): a second thread buys nothing, and on a busy machine (other jobs on the cores) 2 threads made a
# 5-step run 80x slower (11.2 s vs 0.14 s of training, measured: OpenMP threads waiting on each other each op).
_OMP = os.environ.get("OMP_NUM_THREADS", "")
THREADS = int(_OMP) if _OMP.isdigit() and int(_OMP) > 0 else 1
TIMEOUT_S = 600  # default bound on any one subprocess

# The suite's data (tests/datagen.py: suite_files), written by pytest_configure, removed by pytest_unconfigure.
DATA_DIR = Path(tempfile.gettempdir()) / f"trainer-test-data-{os.getpid()}"
ALPACA = DATA_DIR / "alpaca_1k.json"  # 1000 Alpaca-shaped rows, a JSON array
CHAT_SINGLE = DATA_DIR / "chat_single_turn.jsonl"  # 50 conversations, one exchange, some with a system turn
CHAT_MULTI = DATA_DIR / "chat_multi_turn.jsonl"  # 10 conversations, 2-5 exchanges

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def pytest_configure(config):
    # Keep the tokenized-data cache of tests away from the user's.
    os.environ.setdefault("TRAINER_CACHE", tempfile.mkdtemp(prefix="trainer-test-cache-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(THREADS)
    write_suite_data()


def pytest_unconfigure(config):
    shutil.rmtree(DATA_DIR, ignore_errors=True)


def write_suite_data() -> Path:
    """Write the files ALPACA, CHAT_SINGLE, CHAT_MULTI name (the same bytes every time)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in datagen.suite_files().items():
        datagen.write(DATA_DIR / name, rows)
    return DATA_DIR


def alpaca_slice(path: Path, n: int) -> Path:
    """The first `n` rows of ALPACA as a JSON array at `path` (the generator's stream: any n rows are a prefix)."""
    path.write_text(json.dumps(datagen.alpaca_rows(n, seed=0)))
    return path


def corpus_lines() -> list[str]:
    """What the test tokenizer is trained on: every text of the suite's data (generated in memory, not read)."""
    return datagen.corpus_lines()


# ----------------------------------------------------------------------------------------------- model, tokenizer
def make_tokenizer(vocab_size: int = 1024, chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_model(vocab_size: int, tie: bool = True, seed: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        initializer_range=init_std,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama + tokenizer: what `model.name_or_path` points at in tests."""
    out = tmp_path_factory.mktemp("tiny-llama")
    # init 0.2, not 0.02: with a final RMSNorm and 64-d tied embeddings, 0.02 leaves logits almost flat and
    # a LoRA cannot move them within a few steps; 0.2 gives a base whose loss visibly falls in 30 steps.
    make_model(len(tokenizer), init_std=0.2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after the test (in-process training runs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------------------------- recipes
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(model_dir: Path, data_path: Path, out: Path, **sections) -> dict:
    """A recipe dict for fast CPU tests; `sections` override per section, e.g. train={'max_steps': 3}."""
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32", "gradient_checkpointing": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(data_path), "max_seq_len": 128, "packing": True, "val_fraction": 0.05},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "eval_every": 2,
            "save_every": 2,
            "seed": 0,
        },
        "output_dir": str(out),
    }
    for name, changes in sections.items():
        if isinstance(changes, dict) and isinstance(raw.get(name), dict):
            raw[name].update(changes)
        else:
            raw[name] = changes
    return raw


def write_recipe(folder: Path, raw: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------- subprocesses
def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for --main_process_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_USE_DEEPSPEED",
)


def accelerate_cmd(config: str, *args: str, processes: int | str | None = None) -> list[str]:
    """`accelerate launch --config_file CONFIG [--num_processes N] --main_process_port FREE ARGS...` with this
    interpreter; CONFIG relative to the repository root (run it with cwd=ROOT)."""
    nproc = ["--num_processes", str(processes)] if processes is not None else []
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *nproc]
    return [*launch, "--main_process_port", str(free_port()), *args]


def clean_env(cpu_only: bool = True, **extra: str) -> dict:
    """The environment for a child process: no launcher or accelerate variables inherited from a surrounding
    launch, this checkout first on PYTHONPATH (scripts run by path put their own folder first), one thread per
    process (OMP_NUM_THREADS=1: several processes share the cores; pass OMP_NUM_THREADS=... to change it) and no
    tokenizer threads. cpu_only: no GPU visible (CUDA_VISIBLE_DEVICES=""), for the multi-process CPU paths even on
    a GPU machine. `extra` overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("ACCELERATE_DEEPSPEED", "ACCELERATE_CONFIG"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def run_bounded(
    cmd: list, *, cwd: Path = ROOT, env: dict | None = None, timeout: float = TIMEOUT_S, merge_output: bool = True
) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session (default env: clean_env()); on timeout kill the whole process group (a launcher
    and its workers) and fail the test. merge_output: stderr into stdout (`.stderr` is None), else apart."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}\n{(err or '')[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_checked(cmd: list, *, expect: int | None = 0, **kw) -> subprocess.CompletedProcess:
    """run_bounded with stdout and stderr apart; asserts the exit code is `expect` (None: any)."""
    out = run_bounded(cmd, merge_output=False, **kw)
    if expect is not None:
        assert out.returncode == expect, (
            f"rc={out.returncode}, expected {expect}: {' '.join(out.args)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return out


def run_cli(*args, expect: int | None = 0, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in one process from the repo root, THREADS threads, a GPU used if there is one
    (default env: clean_env(cpu_only=False, OMP_NUM_THREADS=THREADS))."""
    env = clean_env(cpu_only=False, OMP_NUM_THREADS=str(THREADS)) if env is None else env
    return run_checked([sys.executable, "-m", "trainer", *args], expect=expect, env=env, **kw)


def run_train(
    raw: dict, folder: Path, *extra, expect: int | None = 0, name: str = "recipe.yaml", **kw
) -> subprocess.CompletedProcess:
    """Write `raw` to FOLDER/NAME and run `trainer train FOLDER/NAME --no-progress EXTRA...` (see run_cli)."""
    return run_cli("train", write_recipe(folder, raw, name), "--no-progress", *extra, expect=expect, **kw)
