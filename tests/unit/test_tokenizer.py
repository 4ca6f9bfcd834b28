"""trainer/tokenizer.py: the run's chat template decided once (model's own, built-ins, Jinja file, fallbacks),
special tokens added only when asked, end-of-turn / stop tokens, BOS never twice, generation_config; case 06."""

import json

import pytest

from tests.conftest import make_tokenizer
from tests.families import case_sp_tokenizer, family_tokenizer, llama3_tokenizer
from trainer.config import DataArgs
from trainer.data import IGNORE, tokenize_sample
from trainer.errors import UserError
from trainer.templates import BUILTIN_NAMES
from trainer.tokenizer import (
    adds_bos,
    encode_chat,
    end_of_turn_ids,
    read_stop_ids,
    run_tokenizer,
    save_tokenizer,
    stop_token_ids,
)

QA = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]


@pytest.fixture
def sp_model_dir(tmp_path):
    """Case 06's model folder: a Llama-2-like tokenizer without a chat template and without ChatML tokens."""
    tok = case_sp_tokenizer()
    tok.save_pretrained(tmp_path / "sp")
    return tmp_path / "sp"


def test_case_06_no_template_no_chatml_tokens_gets_plain_and_trains_eos(sp_model_dir):
    """Case 06: the fallback ends replies with the tokenizer's eos (</s>, id 2), which is trained and stops."""
    chat = run_tokenizer(str(sp_model_dir))
    tok = chat.tokenizer
    assert chat.template == "builtin:plain"
    assert chat.end_of_turn == [2] and chat.stop_ids == [2] and tok.eos_token_id == 2
    [(ids, labels)] = tokenize_sample(tok, QA, DataArgs(path="x"))
    assert tok.decode(ids) == "<s> User: What is the capital of France?\n\nAssistant: Paris.</s>"
    assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE]) == ["▁Paris", ".", "</s>"]
    assert ids.count(1) == 1 and ids[0] == 1  # BOS once, as the tokenizer adds it
    assert "<|im_end|>" not in tok.decode(ids)


def test_no_template_with_chatml_tokens_gets_chatml(tmp_path):
    tok = make_tokenizer(chat_template=None)
    tok.save_pretrained(tmp_path / "m")
    chat = run_tokenizer(str(tmp_path / "m"))
    assert chat.template == "builtin:chatml"
    assert chat.tokenizer.convert_ids_to_tokens(chat.end_of_turn) == ["<|im_end|>"]


def test_models_own_template_is_kept(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "m")
    chat = run_tokenizer(str(tmp_path / "m"))
    assert chat.template == "model" and chat.tokenizer.chat_template == tokenizer.chat_template


def test_builtin_whose_tokens_the_vocabulary_lacks_is_refused_unless_asked(sp_model_dir):
    with pytest.raises(UserError) as err:
        run_tokenizer(str(sp_model_dir), DataArgs(path="x", chat_template="chatml"))
    assert str(err.value) == (
        "data.chat_template=chatml writes <|im_start|>, <|im_end|>, which the vocabulary lacks; set "
        "data.add_special_tokens: true to add them (embeddings resized, their rows trained and saved with the run), "
        "or choose a template the vocabulary has tokens for (plain ends turns with eos)"
    )
    chat = run_tokenizer(str(sp_model_dir), DataArgs(path="x", chat_template="chatml", add_special_tokens=True))
    tok = chat.tokenizer
    assert chat.new_tokens == ["<|im_start|>", "<|im_end|>"] and chat.new_token_ids == [len(tok) - 2, len(tok) - 1]
    assert chat.end_of_turn == [len(tok) - 1] and chat.stop_ids == [len(tok) - 1, 2]
    [(ids, labels)] = tokenize_sample(tok, QA, DataArgs(path="x"))
    trained = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE])
    # the tokenizer puts a "▁" in front of the text after each added token (legacy Llama behaviour; inference too)
    assert trained == ["P", "aris", ".", "<|im_end|>", "▁", "\n"] and ids[0] == tok.bos_token_id


def test_unknown_name_and_jinja_file(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="neither a built-in .* nor a Jinja file"):
        run_tokenizer(str(tmp_path / "m"), DataArgs(path="x", chat_template="chatmlx"))
    f = tmp_path / "t.jinja"
    f.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat = run_tokenizer(str(tmp_path / "m"), DataArgs(path="x", chat_template=str(f)))
    assert chat.template == str(f) and chat.end_of_turn == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_template_whose_turns_end_with_no_special_token_is_refused(tmp_path, tokenizer):
    f = tmp_path / "t.jinja"
    f.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(UserError) as err:
        run_tokenizer(str(tmp_path / "m"), DataArgs(path="x", chat_template=str(f)))
    assert str(err.value).startswith("chat template: an assistant turn ends with '\\n', which holds no special token")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_builtin_renders_and_ends_turns_with_a_special_token(name):
    """Each built-in on a Llama-3-like tokenizer (tokens added where the built-in needs them): one sample,
    ids equal to apply_chat_template's, the reply trained up to its end-of-turn token."""
    tok = llama3_tokenizer()
    from trainer.templates import builtin_template, required_tokens

    tok.add_tokens([t for t in required_tokens(name) if t not in tok.get_vocab()], special_tokens=True)
    tok.chat_template = builtin_template(name, adds_bos(tok))
    tok.pad_token = tok.eos_token
    msgs = [{"role": "user", "content": "What is the capital of France?"}, *QA[1:]]
    msgs = [*msgs, {"role": "user", "content": "And of Peru?"}, {"role": "assistant", "content": "Lima."}]
    [(ids, labels)] = tokenize_sample(tok, msgs, DataArgs(path="x"))
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    eot = {
        "chatml": "<|im_end|>",
        "qwen": "<|im_end|>",
        "qwen3": "<|im_end|>",
        "llama2": "<|end_of_text|>",
        "llama3": "<|eot_id|>",
        "mistral": "<|end_of_text|>",
        "gemma": "<end_of_turn>",
        "phi3": "<|end|>",
        "plain": "<|end_of_text|>",
    }[name]
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok))[0] == eot
    assert "Paris." in trained and "Lima." in trained and "capital" not in trained and trained.count(eot) == 2


def test_encode_chat_adds_bos_once():
    tok = family_tokenizer("llama2")
    assert adds_bos(tok)
    assert encode_chat(tok, "Hello") == tok("Hello")["input_ids"]
    assert encode_chat(tok, "<s>Hello") == tok("<s>Hello", add_special_tokens=False)["input_ids"]  # not twice
    ids, offsets = encode_chat(tok, "Hello", with_offsets=True)
    assert offsets[0] is None and offsets[1][0] == 0
    qwen = family_tokenizer("qwen2.5")
    assert not adds_bos(qwen) and encode_chat(qwen, "Hello") == qwen("Hello")["input_ids"]


def test_stop_ids_end_of_turn_then_eos():
    tok = family_tokenizer("llama3")  # <|eot_id|> ends a turn, <|end_of_text|> is eos
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == ["<|eot_id|>", "<|end_of_text|>"]


def test_save_tokenizer_writes_the_stop_list(tmp_path):
    tok = family_tokenizer("llama3")
    save_tokenizer(tok, tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stop_token_ids(tok) == read_stop_ids(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
