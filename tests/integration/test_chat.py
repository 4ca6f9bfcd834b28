"""`trainer chat` stops where training taught the reply to end (case 06: a base model without a chat template)."""

import json

import pytest
import torch

from tests.conftest import write_jsonl
from tests.families import case_sp_tokenizer
from trainer.config import recipe_from_dict

QA = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.mark.slow
def test_case_06_no_template_model_learns_to_stop_and_chat_stops(tmp_path, capsys):
    """Case 06 end to end: SentencePiece Llama-2-like base without a template; 60 full fine-tuning steps on one
    repeated Q/A (the case's command); `trainer chat --prompt` answers "Paris." and stops on </s>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.cli import main
    from trainer.train import run

    tok = case_sp_tokenizer()
    model_dir = tmp_path / "model"
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "gradient_checkpointing": False},
            "lora": None,
            "data": {
                "path": str(write_jsonl(tmp_path / "e_repeat.jsonl", [{"messages": QA}] * 16)),
                "max_seq_len": 128,
                "val_fraction": 0.0,
                "packing": False,
            },
            "train": {
                "max_steps": 60,
                "micro_batch_size": 8,
                "grad_accum": 1,
                "lr": 3e-3,
                "warmup_ratio": 0.0,
                "log_every": 10,
                "save_every": 100,
            },
            "output_dir": str(tmp_path / "e60"),
        }
    )
    summary = run(recipe, show_progress=False)
    assert summary["tokenizer"]["chat_template"] == "builtin:plain"
    assert summary["tokenizer"]["stop_token_ids"] == [2] and summary["data"]["train"]["target_tokens"] == 16 * 3
    gen = json.loads((tmp_path / "e60" / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2]
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "e60"), "--prompt", "What is the capital of France?"]) == 0
    assert capsys.readouterr().out == "Paris.\n"  # the reply, stopped on </s>: no template text, no repetition
