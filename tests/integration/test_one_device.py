"""The one-device stage on a tiny trained run: merge, eval, weight deltas, chat adapter switching, GGUF export."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, run_train, tiny_recipe, write_jsonl

pytestmark = pytest.mark.slow  # every test here needs a trained run (a `trainer train` subprocess) or runs the CLI


def task_rows(n=80):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return [
        {
            "prompt": f"Repeat twice: {words[i % 10]} {words[(i * 3) % 10]}",
            "completion": f"{words[i % 10]} {words[(i * 3) % 10]} {words[i % 10]} {words[(i * 3) % 10]}",
        }
        for i in range(n)
    ]


def train_cli(tmp, model_dir, name, **sections):
    data = write_jsonl(tmp / "task.jsonl", task_rows())
    raw = tiny_recipe(
        model_dir,
        data,
        tmp / name,
        **{
            "data": {"max_seq_len": 64, "val_fraction": 0.1, "test_fraction": 0.2},
            "train": {"max_steps": 6, "lr": 1e-2, "save_every": 6, "eval_every": 6},
            "generation": {"max_new_tokens": 8, "num_samples": 2},
            **sections,
        },
    )
    run_train(raw, tmp, name=f"{name}.yaml")
    return tmp / name


def cli(*args):
    return run_cli(*args).stdout


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    return train_cli(tmp_path_factory.mktemp("one"), tiny_model_dir, "lora")


def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok("Repeat twice: golf hotel")["input_ids"]])


def test_merge_matches_base_plus_adapter(lora_run, tiny_model_dir):
    out = cli("merge", lora_run)
    assert "max |logits(merged) - logits(base + adapter)|" in out
    report = json.loads((lora_run / "merged" / "merge_report.json").read_text())
    assert report["max_abs_diff_merged_vs_adapter"] < 1e-4  # fp32 rounding; logits here reach ~30
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = prompt_ids(lora_run / "merged")
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, tuned(x).logits, atol=1e-4, rtol=0)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "model.safetensors"):
        assert (lora_run / "merged" / name).is_file(), name


def test_qlora_adapter_merges_into_unquantized_base(tmp_path, tiny_model_dir):
    run = train_cli(
        tmp_path,
        tiny_model_dir,
        "qlora",
        model={"name_or_path": str(tiny_model_dir), "quantization": "nf4", "gradient_checkpointing": False},
    )
    cli("merge", run)
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert (
        report["max_abs_diff_merged_vs_adapter"] < 1e-4
    )  # fp32 rounding; logits here reach ~30  # merged == unquantized base + adapter
    # The 4-bit training model differs by the NF4 quantization error: reported, and not zero.
    assert 0 < report["max_abs_diff_merged_vs_4bit_training_model"] < 50
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_eval_report_and_perplexity_is_exp_mean_token_loss(lora_run, tiny_model_dir):
    cli("eval", lora_run, "--exact-match")
    report = json.loads((lora_run / "eval" / "report.json").read_text())
    assert report["split"] == "test"
    for name in ("base", "tuned"):
        assert set(report[name]) >= {"exact_match", "perplexity", "loss", "tokens"}
        assert report[name]["perplexity"] == pytest.approx(math.exp(report[name]["loss"]), rel=1e-9)
    assert len(report["samples"]) == 2 and "tuned_greedy" in report["samples"][0]
    assert (lora_run / "eval" / "report.md").read_text().startswith("# Evaluation")
    for png in ("loss.png", "lr.png", "eval_ppl.png", "weight_deltas.png"):
        assert (lora_run / "plots" / png).stat().st_size > 1000
    # Independent: HF's own mean loss per test sample, weighted by its target count, on base + adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.config import load_recipe
    from trainer.data import prepare_data
    from trainer.tokenizer import load_tokenizer

    recipe = load_recipe(lora_run / "config.yaml")
    tok = load_tokenizer(str(lora_run / "adapter"))
    test = prepare_data(recipe.data, tok, log=lambda m: None).test
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter").eval()
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for row in test:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            out = tuned(input_ids=ids, labels=labels)
            total += float(out.loss) * n
            count += n
            mask = labels[:, 1:] != -100
            correct += int((out.logits[:, :-1].argmax(-1) == labels[:, 1:])[mask].sum())
    assert count == report["tuned"]["tokens"]
    assert report["tuned"]["loss"] == pytest.approx(total / count, rel=1e-5)
    # token accuracy: the argmax of HF's own logits, counted here
    assert report["tuned"]["token_accuracy"] == pytest.approx(correct / count, abs=1e-12)
    assert "| token accuracy |" in (lora_run / "eval" / "report.md").read_text()


def test_weight_deltas_equal_direct_computation(lora_run):
    if not (lora_run / "eval" / "weight_deltas.csv").exists():
        cli("eval", lora_run)
    rows = list(csv.DictReader((lora_run / "eval" / "weight_deltas.csv").open()))
    assert len(rows) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for row in rows:
        key = f"base_model.model.{row['module']}"
        a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
        assert float(row["delta_norm"]) == pytest.approx(float((scale * b @ a).norm()), rel=1e-5)
        assert float(row["relative"]) == pytest.approx(float(row["delta_norm"]) / float(row["weight_norm"]), rel=1e-6)


def test_chat_adapter_switching_gives_each_adapters_logits(lora_run, tmp_path, tiny_model_dir):
    other = train_cli(
        tmp_path,
        tiny_model_dir,
        "other",
        train={"max_steps": 3, "lr": 3e-2, "seed": 5, "save_every": 3, "eval_every": 3},
    )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.chat import BASE, load_chat_models, reply

    chat = load_chat_models(lora_run, {"other": other / "adapter"})
    assert chat.adapters == ["tuned", "other"]
    x = prompt_ids(tiny_model_dir)

    def active_logits():
        with chat.as_active() as model, torch.no_grad():
            return model(x).logits

    expected = {}
    for name, folder in (("tuned", lora_run / "adapter"), ("other", other / "adapter")):
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
        with torch.no_grad():
            expected[name] = alone(x).logits
    with torch.no_grad():
        expected[BASE] = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(x).logits
    for name in ("other", BASE, "tuned", "other"):
        chat.use(name)
        torch.testing.assert_close(active_logits(), expected[name], atol=1e-6, rtol=0)
    assert (expected["tuned"] - expected["other"]).abs().max() > 1e-3
    assert isinstance(reply(chat, [{"role": "user", "content": "hi"}], max_new_tokens=4), str)


def test_export_gguf_round_trip(lora_run, tmp_path):
    out = tmp_path / "gguf" / "model.gguf"
    cli("export", lora_run, "--gguf", "f16", "--out", out)
    from transformers import AutoModelForCausalLM

    x = prompt_ids(lora_run / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    with torch.no_grad():
        diff = (loaded(x).logits - merged(x).logits).abs().max()
    assert diff < 2e-2, diff  # f16 rounding of the weights; measured ~6e-3 on this model
