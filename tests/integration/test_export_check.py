"""`trainer export RUN_DIR --gguf q4_k_m --check` on a tiny trained run, through the real CLI: every hop
(adapter -> merged -> f16 -> q8_0 -> q4_k_m) scored on the run's test split, the GGUFs in llama.cpp itself;
and `trainer merge --dtype`.

The base is the planted-reply model of tests/gguf_models.py (hidden 256: real K-quant rows) and the task's
answer is that reply, so a correct export answers every test prompt exactly and stops at the end of turn.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_recipe, write_jsonl
from tests.gguf_models import REPLY, build_model

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")  # the gguf extra: CI installs it (.ci/run)
pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the date?",
    "Name a color.",
    "Say hello.",
    "Is the cat red?",
    "Count to 3.",
    "Spell dog.",
    "What is 2 + 2?",
    "Where is the fox?",
    "Who are you?",
    "Any answer?",
]


def cli(*args, ok=(0,)):
    out = subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode in ok, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-check")
    base = build_model(tmp / "base", "bpe")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{QUESTIONS[i % 10]} ({i})"},
                {"role": "assistant", "content": REPLY},
            ]
        }
        for i in range(40)
    ]
    data = write_jsonl(tmp / "task.jsonl", rows)
    raw = tiny_recipe(
        base,
        data,
        tmp / "run",
        data={"max_seq_len": 64, "packing": False, "val_fraction": 0.1, "test_fraction": 0.25},
        train={"max_steps": 2, "lr": 1e-4, "save_every": 2, "eval_every": 2},
        generation={"max_new_tokens": 8, "num_samples": 2, "temperature": 0.6, "top_p": 0.95},
    )
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cli("train", recipe, "--no-progress")
    return tmp / "run"


def assert_stop_list(run_dir):
    """The stop-token contract of the training side: merge writes generation_config.json whose eos_token_id is
    the run's list of end-of-turn/stop ids (here <|im_end|> and <|endoftext|>, two different ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    config = json.loads((run_dir / "merged" / "generation_config.json").read_text())
    assert config["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_export_check_every_hop(run_dir):
    cli("merge", run_dir)
    assert_stop_list(run_dir)
    out = cli("export", run_dir, "--gguf", "q4_k_m", "--check")
    export = run_dir / "export"
    report = json.loads((export / "report.json").read_text())
    assert report["failures"] == [] and "Result: PASS" in (export / "report.md").read_text()
    assert [h["hop"] for h in report["hops"]] == ["adapter", "merged", "f16", "q8_0", "q4_k_m"]
    assert report["split"] == "test" and report["conversations"] == 10
    hops = {h["hop"]: h for h in report["hops"]}
    for name, hop in hops.items():
        assert hop["exact_match"] == 1.0 and hop["exact_match_n"] == 10, name
        assert hop["stopped"] == 10, name  # every hop stops on the end-of-turn token: "ok" and done
        assert hop["bytes"] > 0
    # perplexity of the reference replies ("ok" + <|im_end|>): the same model at every hop, up to rounding
    ppl = hops["merged"]["perplexity"]
    assert abs(hops["adapter"]["perplexity"] - ppl) < 1e-3 * ppl
    assert abs(hops["f16"]["perplexity"] - ppl) < 5e-3 * ppl
    assert abs(hops["q4_k_m"]["perplexity"] - ppl) < 0.1 * ppl
    for name in ("f16", "q8_0", "q4_k_m"):
        hop, vs = hops[name], hops[name]["vs_merged"]
        assert vs["texts_tokenized_equal"] == vs["texts"] == 20
        assert vs["prompts_rendered_equal"] == vs["prompts"] == 10
        assert hop["stopped"] == 10 and hop["completion_tokens"] <= 20  # "ok" + end of turn, every time
        assert hop["generation_tokens_per_s"] > 0 and hop["prompt_tokens_per_s"] > 0
        assert (export / f"model-{name}.gguf").stat().st_size == hop["bytes"]
    assert hops["f16"]["vs_merged"]["top1_agree"] == hops["f16"]["vs_merged"]["positions"]
    assert hops["f16"]["vs_merged"]["max_abs_logit_diff"] < 0.02  # measured 0.003
    assert hops["q8_0"]["vs_merged"]["max_abs_logit_diff"] < 0.2  # measured 0.076
    assert hops["q4_k_m"]["vs_merged"]["max_abs_logit_diff"] < 1.2  # measured 0.68 (flat random logits)
    assert hops["q4_k_m"]["fallback"] == [] and hops["q4_k_m"]["tensor_types"]["Q4_K"] > 0
    assert hops["q4_k_m"]["bytes"] < hops["q8_0"]["bytes"] < hops["f16"]["bytes"]
    assert report["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    modelfile = (export / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./model-q4_k_m.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>')
    assert modelfile.endswith(
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n'
        "PARAMETER temperature 0.6\nPARAMETER top_p 0.95\nPARAMETER num_predict 8\n"
    )
    assert "check: wrote" in out.stdout


def test_merge_saves_in_the_chosen_dtype_and_checks_in_fp32(run_dir):
    from safetensors import safe_open

    merged = run_dir / "merged"
    cli("merge", run_dir, "--dtype", "bf16")
    assert_stop_list(run_dir)
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["saved_dtype"] == "bf16" and report["check_dtype"] == "fp32"
    assert report["max_abs_diff_merged_vs_adapter"] < 1e-4  # the merge itself, in fp32
    assert 0 < report["max_abs_diff_saved_dtype_vs_fp32"] < 0.2  # bf16 storage rounding, logits std ~0.8
    with safe_open(merged / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    # a bf16 merged model is quantized from a bf16 file (lossless), not from f16
    cli("export", run_dir, "--gguf", "q6_k", "--out", run_dir / "bf16" / "m.gguf")
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(run_dir / "bf16" / "m.gguf").tensors}
    assert types == {"F32", "Q6_K"}
    # auto: the base checkpoint's own storage dtype (this base is saved in float32)
    cli("merge", run_dir)
    assert json.loads((merged / "merge_report.json").read_text())["saved_dtype"] == "fp32"
    with safe_open(merged / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
