"""The family matrix: for each model family users bring (tiny stand-ins in tests/families.py), the trained labels
token by token, the ids equal to the template's own tokenization, training through `train.run`, greedy generation
that stops at the end of the reply, merge (generation_config's stop list) and the packing check."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.conftest import write_jsonl
from tests.families import FAMILIES, example, family_tokenizer, save_family
from trainer.config import DataArgs, recipe_from_dict
from trainer.data import IGNORE, prepare_messages, tokenize_sample
from trainer.tokenizer import _choose_template, adds_bos, end_of_turn_ids, stop_token_ids

# The trained tokens of `example(name)` (tests/families.py), as the tokenizer spells them, written out by hand from
# each template: every reply and the tokens the template ends its turn with, nothing else.
TRAINED = {
    # ' Paris. </s>': the space before </s> is a "▁" of its own; </s> ends the turn (eos)
    "llama2": ["▁Paris", ".", "▁", "</s>", "▁Lima", ".", "▁", "</s>"],
    # '[/INST]Paris.</s>': no space, so no "▁" prefix on the reply
    "mistral": ["P", "ar", "is", ".", "</s>", "Li", "ma", ".", "</s>"],
    "llama3": ["P", "ar", "is", ".", "<|eot_id|>", "Li", "ma", ".", "<|eot_id|>"],
    "qwen2.5": ["P", "ar", "is", ".", "<|im_end|>", "Ċ", "Li", "ma", ".", "<|im_end|>", "Ċ"],
    # the first reply as the full render shows it (reasoning dropped), the last one with its <think> block
    "qwen3": ["P", "ar", "is", ".", "<|im_end|>", "Ċ"]
    + ["<think>", "Ċ", "I", "t", "Ġis", "ĠLima", ".", "Ċ", "</think>", "Ċ", "Ċ", "Li", "ma", ".", "<|im_end|>", "Ċ"],
    "gemma": ["P", "ar", "is", ".", "<end_of_turn>", "<0x0A>", "Li", "ma", ".", "<end_of_turn>", "<0x0A>"],
    "gemma2": ["P", "ar", "is", ".", "<end_of_turn>", "<0x0A>", "Li", "ma", ".", "<end_of_turn>", "<0x0A>"],
    # <|end|> swallows the newline after it (rstrip); the conversation's closing eos follows the last reply
    "phi3": ["▁Paris", ".", "<|end|>", "▁Lima", ".", "<|end|>", "<|endoftext|>"],
    # no template: the built-in `plain` one, replies closed by the tokenizer's eos
    "gpt2": ["ĠParis", ".", "<|endoftext|>", "ĠLima", ".", "<|endoftext|>"],
    "opt": ["ĠParis", ".", "</s>", "ĠLima", ".", "</s>"],
}
STOPS = {
    "llama2": ["</s>"],
    "mistral": ["</s>"],
    "llama3": ["<|eot_id|>", "<|end_of_text|>"],
    "qwen2.5": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>"],
    "gemma": ["<end_of_turn>", "<eos>"],
    "gemma2": ["<end_of_turn>", "<eos>"],
    "phi3": ["<|end|>", "<|endoftext|>"],
    "gpt2": ["<|endoftext|>"],
    "opt": ["</s>"],
}
NAMES = list(FAMILIES)


def run_tokenizer_of(name: str):
    """The family tokenizer as `run_tokenizer` decides it (template chosen, pad set), without saving a model."""
    tok = copy.deepcopy(family_tokenizer(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    text, _, _ = _choose_template(tok, None, False)
    tok.chat_template = text
    return tok


@pytest.mark.parametrize("name", NAMES)
def test_labels_token_by_token_and_ids_are_the_templates_own_tokenization(name):
    tok = run_tokenizer_of(name)
    data = DataArgs(path="x", **FAMILIES[name].data)
    [(ids, labels)] = tokenize_sample(tok, example(name), data)
    assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE]) == TRAINED[name]
    # Prompt positions carry -100, replies their own id: labels are ids or -100, nothing else.
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    # The ids are exactly what apply_chat_template(tokenize=True) feeds (every template here writes its BOS
    # itself when the tokenizer adds one, so the rule "BOS as the tokenizer adds it, never twice" agrees).
    messages = prepare_messages(example(name), data)
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    # BOS first exactly when the tokenizer adds one to plain text, never twice.
    assert (ids[0] == tok.bos_token_id) == adds_bos(tok) and ids[1] != tok.bos_token_id
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == STOPS[name]
    assert set(end_of_turn_ids(tok)) <= set(stop_token_ids(tok))


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_template_without_system_role_names_the_row(tmp_path, name):
    """Without data.fold_system_turn the template's own message comes back in one line naming file:line."""
    from trainer.data import prepare_data
    from trainer.errors import UserError

    tok = run_tokenizer_of(name)
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": EX_SIMPLE}, {"messages": example(name)}])
    with pytest.raises(UserError) as err:
        prepare_data(DataArgs(path=str(f), val_fraction=0.0), tok, cache_root=tmp_path / "c", log=lambda m: None)
    message = str(err.value)
    assert message.startswith(f"{f}:2: the chat template refused this conversation"), message
    assert ("System role not supported" if name == "gemma" else "Conversation roles must alternate") in message
    assert "data.fold_system_turn: true" in message and "\n" not in message


EX_SIMPLE = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]


def _recipe(model_dir, data_path, out, **data):
    return recipe_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "gradient_checkpointing": False, "chunked_loss": True},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"path": str(data_path), "max_seq_len": 128, "val_fraction": 0.0, **data},
            "train": {
                "max_steps": 40,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 2e-2,
                "warmup_ratio": 0.0,
                "log_every": 10,
                "eval_every": 1000,
                "save_every": 1000,
                "seed": 0,
            },
            "output_dir": str(out),
        }
    )


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_generate_stops_merge_and_packing(tmp_path, name):
    """Train (LoRA, packing requested) on one repeated Q/A and the multi-turn example; greedy generation answers
    and stops on an end-of-turn token; merged/generation_config.json lists the stop ids; the packing check passes
    (falls back for OPT)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.generate import prompt_ids
    from trainer.merge import merge_run
    from trainer.train import run

    model_dir = save_family(name, tmp_path / "model")
    rows = [{"messages": EX_SIMPLE}] * 14 + [{"messages": example(name)}] * 2
    data_path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    summary = run(_recipe(model_dir, data_path, out, **FAMILIES[name].data), show_progress=False)
    tok = summary["tokenizer"]
    assert tok["end_of_turn_tokens"] == STOPS[name][: len(tok["end_of_turn_ids"])]
    assert summary["steps"] == 40 and summary["final_loss"] < 0.5, summary["final_loss"]
    assert summary["packing"]["requested"] and summary["packing"]["used"] is FAMILIES[name].packs
    assert (summary["packing"]["check"]["leak"] == 0.0) is FAMILIES[name].packs
    adapter_gen = json.loads((out / "adapter" / "generation_config.json").read_text())
    assert adapter_gen["eos_token_id"] == tok["stop_token_ids"]

    merge_run(out, log=lambda m: None)
    merged_gen = json.loads((out / "merged" / "generation_config.json").read_text())
    assert merged_gen["eos_token_id"] == tok["stop_token_ids"]

    # Greedy generation with the merged model, as a serving engine would run it: its tokenizer, its template,
    # its generation_config (stop ids). The reply is the trained answer and ends on a stop token.
    merged_tok = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = prompt_ids(merged_tok, [{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    assert gen[-1] in tok["stop_token_ids"] and len(gen) < 20, merged_tok.convert_ids_to_tokens(gen)
    answer = merged_tok.decode(gen, skip_special_tokens=True)
    if name == "qwen3":  # its template gives the last reply an (empty) <think> block, so the model writes one
        assert answer.startswith("<think>\n\n</think>\n\n"), answer
        answer = answer.split("</think>")[-1]
    assert answer.strip() == "Paris.", merged_tok.convert_ids_to_tokens(gen)


@pytest.mark.slow
def test_added_special_tokens_are_trained_saved_and_merged(tmp_path):
    """A Llama-2-like base given the `chatml` built-in with data.add_special_tokens: the two new tokens get
    embedding rows, trained as peft trainable tokens of embed_tokens and the untied lm_head, saved with the
    adapter; the merged model has the grown vocabulary and stops on <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.generate import reply
    from trainer.merge import merge_run
    from trainer.train import run

    model_dir = save_family("llama2", tmp_path / "model")
    data_path = write_jsonl(tmp_path / "d.jsonl", [{"messages": EX_SIMPLE}] * 16)
    out = tmp_path / "run"
    summary = run(_recipe(model_dir, data_path, out, chat_template="chatml", add_special_tokens=True))
    vocab = len(family_tokenizer("llama2"))
    new = [vocab, vocab + 1]
    assert summary["tokenizer"]["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert summary["tokenizer"]["end_of_turn_ids"] == [vocab + 1] and summary["tokenizer"]["stop_token_ids"] == [
        vocab + 1,
        2,
    ]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": new, "lm_head": new}
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    deltas = {k: v.shape for k, v in saved.items() if "trainable_tokens" in k}
    assert sorted(deltas.values()) == [(2, 64), (2, 64)]
    merge_run(out, log=lambda m: None)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) == vocab + 2
    assert json.loads((out / "merged" / "generation_config.json").read_text())["eos_token_id"] == [vocab + 1, 2]
    assert reply(merged, tok, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20) == (
        "Paris."
    )
