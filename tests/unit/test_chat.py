"""`trainer chat --prompts FILE [--compare]`: the file formats, their errors, and the replies written to
RUN_DIR/eval/prompts.{md,jsonl} equal to the models' own greedy generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from trainer import chat, generate
from trainer.errors import UserError


def test_read_prompts_plain_lines_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("Convert 5 March 2024 to YYYY-MM-DD.\n\n  What is 2+2?  \n")
    assert chat.read_prompts(plain) == [
        {"prompt": "Convert 5 March 2024 to YYYY-MM-DD.", "reference": None},
        {"prompt": "  What is 2+2?", "reference": None},  # as written; trailing whitespace dropped
    ]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a, b", "reference": "c"}\n\n{"prompt": "d"}\n')
    assert chat.read_prompts(rows) == [{"prompt": "a, b", "reference": "c"}, {"prompt": "d", "reference": None}]
    detected = tmp_path / "p.txt2"
    detected.write_text('{"prompt": "x", "reference": "y"}\n')  # not .jsonl, but its first line is an object
    assert chat.read_prompts(detected) == [{"prompt": "x", "reference": "y"}]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2: not valid JSON"),
        ('{"question": "a"}\n', 'p.jsonl:1: expected {"prompt": "...", "reference": "..." (optional)}'),
        ('{"prompt": "a", "reference": 5}\n', "p.jsonl:1: reference must be a string (got int)"),
        ("\n\n", "no prompts in the file"),
    ],
)
def test_read_prompts_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        chat.read_prompts(path)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    with pytest.raises(UserError, match="no such file"):
        chat.read_prompts(tmp_path / "missing.txt")


@pytest.fixture
def run_folder(tiny_model_dir, tmp_path) -> Path:
    """A LoRA run folder as `trainer train` leaves it (recipe + adapter), with a non-zero adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run.mkdir()
    recipe = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": "unused.jsonl"}, "output_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B = 0 would make tuned == base
    model.save_pretrained(run / "adapter")
    from trainer.checkpoint import write_manifest

    write_manifest(run / "adapter")  # written last by training: the adapter is complete
    return run


def test_prompts_compare_writes_every_models_greedy_reply(run_folder, tmp_path, capsys):
    from peft import PeftModel

    from trainer.cli import main
    from trainer.model import load_base
    from trainer.tokenizer import run_tokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Convert 5 March 2024 to YYYY-MM-DD.", "reference": "2024-03-05"})
        + "\n"
        + json.dumps({"prompt": "What is | a pipe?"})
        + "\n"
    )
    rc = main(["chat", str(run_folder), "--prompts", str(prompts), "--compare", "--max-new-tokens", "6"])
    assert rc == 0
    rows = [json.loads(line) for line in (run_folder / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Convert 5 March 2024 to YYYY-MM-DD.", "What is | a pipe?"]
    assert [r["reference"] for r in rows] == ["2024-03-05", None]
    assert all(sorted(r["replies"]) == ["base", "tuned"] for r in rows)

    recipe_model = yaml.safe_load((run_folder / "config.yaml").read_text())["model"]["name_or_path"]
    tok = run_tokenizer(recipe_model).tokenizer
    from trainer.config import ModelArgs

    base = load_base(ModelArgs(name_or_path=recipe_model), dtype=torch.float32, quantize=False).eval()
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    want_base = generate.generate(base, tok, convs, max_new_tokens=6)
    tuned = PeftModel.from_pretrained(base, str(run_folder / "adapter")).eval()
    want_tuned = generate.generate(tuned, tok, convs, max_new_tokens=6)
    assert [r["replies"]["base"] for r in rows] == want_base
    assert [r["replies"]["tuned"] for r in rows] == want_tuned
    assert want_base != want_tuned  # the adapter changes the replies: the columns are not one model twice

    md = (run_folder / "eval" / "prompts.md").read_text().splitlines()
    assert md[2] == "| prompt | reference | base | tuned |"
    assert md[4].startswith("| Convert 5 March 2024 to YYYY-MM-DD. | 2024-03-05 | ")
    assert md[5].startswith("| What is \\| a pipe? | - | ")  # a pipe in a cell is escaped
    printed = capsys.readouterr().out
    assert "2024-03-05" in printed and "prompts.md" in printed


def test_prompts_without_compare_answer_with_the_tuned_model_only(run_folder, tmp_path):
    from trainer.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    assert main(["chat", str(run_folder), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in (run_folder / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [sorted(r["replies"]) for r in rows] == [["tuned"]]
    assert "| prompt | tuned |" in (run_folder / "eval" / "prompts.md").read_text()  # no reference column


def test_prompt_and_prompts_together_are_refused(run_folder, tmp_path, capsys):
    from trainer.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    assert main(["chat", str(run_folder), "--prompts", str(prompts), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --prompt and --prompts: give one of them"


def test_a_full_fine_tune_is_tuned_and_compare_loads_its_original_base(tiny_model_dir, tmp_path):
    """A full fine-tune's own model answers as "tuned" (not "base"); --compare puts the recipe's original model
    beside it as "base"."""
    from transformers import AutoModelForCausalLM

    from trainer.cli import main
    from trainer.config import ModelArgs
    from trainer.model import load_base
    from trainer.tokenizer import run_tokenizer

    run = tmp_path / "full"
    run.mkdir()
    recipe = {"model": {"name_or_path": str(tiny_model_dir)}, "lora": None, "data": {"path": "x.jsonl"}}
    (run / "config.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(run)}))
    tuned = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(run / "model")
    from trainer.checkpoint import write_manifest

    write_manifest(run / "model")  # written last by training: the model is complete
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nWhat is 3 plus 4?\n")

    assert main(["chat", str(run), "--prompts", str(prompts), "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (run / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [sorted(r["replies"]) for r in rows] == [["tuned"], ["tuned"]]

    assert main(["chat", str(run), "--prompts", str(prompts), "--compare", "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (run / "eval" / "prompts.jsonl").read_text().splitlines()]
    tok = run_tokenizer(str(tiny_model_dir)).tokenizer
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    models = {
        "base": load_base(ModelArgs(name_or_path=str(tiny_model_dir)), dtype=torch.float32, quantize=False),
        "tuned": load_base(ModelArgs(name_or_path=str(run / "model")), dtype=torch.float32, quantize=False),
    }
    for name, model in models.items():
        assert [r["replies"][name] for r in rows] == generate.generate(model.eval(), tok, convs, max_new_tokens=5)
    assert [r["replies"]["base"] for r in rows] != [r["replies"]["tuned"] for r in rows]
