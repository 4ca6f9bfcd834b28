"""GGUF export without the runtime: tokenizer metadata of both tokenizer kinds, Qwen2 tensors, stop tokens,
the Ollama Modelfile, refusals. (What llama.cpp does with the files is in test_export_llama_cpp.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from tests.gguf_models import CHATML, LLAMA2_CHAT, build_model, byte_level_tokenizer  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.export import export_gguf  # noqa: E402
from trainer.export.modelfile import PROBES, match_family, modelfile_text, write_modelfile  # noqa: E402
from trainer.export.vocab import byte_level_pre_name  # noqa: E402

T = gguf.TokenType
GEN = SimpleNamespace(temperature=0.7, top_p=0.9, max_new_tokens=16)


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {kind: build_model(root / kind, kind, hidden=64, intermediate=128) for kind in ("bpe", "spm", "qwen2")}


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def test_sentencepiece_tokenizer_is_written_as_llama_spm(models, tmp_path):
    from transformers import AutoTokenizer

    facts = export_gguf(models["spm"], tmp_path / "m.gguf", "f16")
    f = _fields(tmp_path / "m.gguf")
    tok = AutoTokenizer.from_pretrained(models["spm"])
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in f
    assert "tokenizer.ggml.merges" not in f
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert (
        len(tokens)
        == len(types)
        == len(scores)
        == json.loads((models["spm"] / "config.json").read_text())["vocab_size"]
    )
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {T.BYTE}
    n_pieces = len(tok) - 259
    assert set(types[259 : 259 + n_pieces]) == {T.NORMAL}
    # scores: minus the rank of the merge producing the piece (the first merge scores 0, later ones lower)
    merges = json.loads((models["spm"] / "tokenizer.json").read_text())["model"]["merges"]
    first = merges[0] if isinstance(merges[0], str) else " ".join(merges[0])
    assert scores[tokens.index(first.replace(" ", ""))] == 0.0
    last = merges[-1] if isinstance(merges[-1], str) else " ".join(merges[-1])
    assert scores[tokens.index(last.replace(" ", ""))] == -(len(merges) - 1)
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.eot_token_id"] == 2  # Llama 2 ends a turn with </s>
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert "tokenizer.ggml.padding_token_id" not in f  # Llama 2 has no pad token
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.chat_template"] == LLAMA2_CHAT
    assert facts["tokenizer"] == "llama" and facts["stop_token_ids"] == [2] and facts["stop_tokens"] == ["</s>"]


def test_byte_level_bpe_carries_end_of_turn_and_eos_as_different_ids(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["bpe"])
    im_end, eot_text = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert im_end != eot_text
    facts = export_gguf(models["bpe"], tmp_path / "m.gguf", "q8_0")
    f = _fields(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.eot_token_id"] == im_end
    assert f["tokenizer.ggml.eos_token_id"] == eot_text
    assert f["tokenizer.ggml.padding_token_id"] == eot_text
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.ggml.eom_token_id" not in f
    assert len(f["tokenizer.ggml.merges"]) == len(
        json.loads((models["bpe"] / "tokenizer.json").read_text())["model"]["merges"]
    )
    assert f["tokenizer.ggml.token_type"][im_end] == T.CONTROL
    assert f["tokenizer.chat_template"] == CHATML
    assert facts["stop_token_ids"] == [im_end, eot_text]
    assert facts["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert facts["eot_token_id"] == im_end and facts["not_stopping_llama_cpp"] == []


def test_end_of_turn_is_what_the_template_writes_not_the_list_order(models, tmp_path):
    copy = tmp_path / "bpe"
    shutil.copytree(models["bpe"], copy)
    config = json.loads((copy / "generation_config.json").read_text())
    im_end, endoftext = config["eos_token_id"]
    config["eos_token_id"] = [endoftext, im_end]
    (copy / "generation_config.json").write_text(json.dumps(config))
    facts = export_gguf(copy, tmp_path / "m.gguf")
    assert facts["eot_token_id"] == im_end and facts["eos_token_id"] == endoftext
    # a third stop id goes to eom (llama.cpp stops on eos, eot and eom); a fourth is reported
    config["eos_token_id"] = [im_end, endoftext, 3, 4]
    (copy / "generation_config.json").write_text(json.dumps(config))
    facts = export_gguf(copy, tmp_path / "m.gguf")
    f = _fields(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.eom_token_id"] == 3
    assert facts["stop_token_ids"] == [im_end, endoftext, 3, 4] and len(facts["not_stopping_llama_cpp"]) == 1
    config["eos_token_id"] = ["<|im_end|>"]
    (copy / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="eos_token_id holds '<|im_end|>'"):
        export_gguf(copy, tmp_path / "m.gguf")


def test_qwen2_is_written_as_qwen2_with_biases_and_no_permutation(models, tmp_path):
    from safetensors.torch import load_file

    export_gguf(models["qwen2"], tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {key: field.contents() for key, field in reader.fields.items()}
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.embedding_length"] == 64 and f["qwen2.attention.head_count"] == 2
    assert f["qwen2.attention.head_count_kv"] == 1 and f["qwen2.block_count"] == 2
    assert f["qwen2.rope.freq_base"] == pytest.approx(10000.0)
    assert f["tokenizer.ggml.pre"] == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(models["qwen2"] / "model.safetensors")
    for part in ("q", "k", "v"):
        bias = tensors[f"blk.1.attn_{part}.bias"]
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(bias.data, hf[f"model.layers.1.self_attn.{part}_proj.bias"].numpy())
    assert "blk.0.attn_output.bias" not in tensors
    # NEOX rotary: q/k rows are stored as Hugging Face has them (f16-rounded), not permuted
    np.testing.assert_array_equal(
        tensors["blk.0.attn_q.weight"].data, hf["model.layers.0.self_attn.q_proj.weight"].half().numpy()
    )


def test_llama_q_rows_are_permuted_for_llama_cpp(models, tmp_path):
    from safetensors.torch import load_file

    export_gguf(models["bpe"], tmp_path / "m.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    q = load_file(models["bpe"] / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].numpy()
    heads, head_dim = 2, 32
    want = q.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(q.shape)  # llama.cpp's permute
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, want)
    assert not np.array_equal(want, q)


def test_bf16_keeps_bf16_weights_bit_exact(models, tmp_path):
    from safetensors.torch import load_file

    export_gguf(models["qwen2"], tmp_path / "m.gguf", "bf16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    t = {x.name: x for x in reader.tensors}["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    want = load_file(models["qwen2"] / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].bfloat16()
    assert np.array_equal(
        np.asarray(t.data).view(np.uint16).reshape(-1), want.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    )


@pytest.mark.parametrize("split", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_names_are_the_ones_llama_cpp_knows(split, tmp_path):
    byte_level_tokenizer(tmp_path, split=split, vocab_size=300)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert byte_level_pre_name(spec, tmp_path / "tokenizer.json") == split


def test_unsupported_tokenizers_and_architectures_are_refused_in_one_line(models, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError) as err:
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and "supports: llama, mistral, qwen2" in str(err.value)

    copy = tmp_path / "spm"
    shutil.copytree(models["spm"], copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    spec["normalizer"] = None
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="split=true"):
        export_gguf(copy, tmp_path / "x.gguf")
    spec["model"]["type"] = "Unigram"
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="'Unigram' tokenizer; supported: byte-level BPE"):
        export_gguf(copy, tmp_path / "x.gguf")

    qwen = tmp_path / "qwen2"
    shutil.copytree(models["qwen2"], qwen)
    config = json.loads((qwen / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=128)
    (qwen / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="sliding_window=128"):
        export_gguf(qwen, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


# ------------------------------------------------------------------------------------------------ Modelfile
def test_modelfile_for_chatml_is_exact(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["bpe"])
    gguf_path = tmp_path / "model-q4_k_m.gguf"
    info = write_modelfile(gguf_path, tok, False, ["<|im_end|>", "<|endoftext|>"], GEN)
    assert info == {"path": str(tmp_path / "Modelfile"), "family": "chatml"}
    assert (tmp_path / "Modelfile").read_text() == (
        "FROM ./model-q4_k_m.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|endoftext|>"\n'
        "PARAMETER temperature 0.7\n"
        "PARAMETER top_p 0.9\n"
        "PARAMETER num_predict 16\n"
    )


def test_modelfile_for_llama2_leaves_the_first_bos_to_the_runtime(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["spm"])
    family = match_family(tok, bos_added=True)
    assert family.name == "llama2"
    assert family.template == (
        '{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}{{ if $first }}{{ else }}<s>{{ end }}'
        "[INST] {{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
        '{{ $first = false }}{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}'
    )
    text = modelfile_text("m.gguf", family, ["</s>"], 0.2, 1.0, 64)
    assert text.splitlines()[-4:] == [
        'PARAMETER stop "</s>"',
        "PARAMETER temperature 0.2",
        "PARAMETER top_p 1",
        "PARAMETER num_predict 64",
    ]
    # a longer conversation than the probes: the Go template's rendering, after the runtime's BOS, is the run's
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]
    assert "<s>" + family.render(convo) == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)


def test_modelfile_chatml_with_a_default_system_prompt(tmp_path):
    from trainer.demo_model import SMOLLM2_CHAT_TEMPLATE

    tok = byte_level_tokenizer(tmp_path, split="gpt-2", vocab_size=300, eos="<|im_end|>")
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    family = match_family(tok, bos_added=False)
    assert family.name == "chatml+default-system"
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>" in family.template
    for convo in PROBES + [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    ]:
        assert family.render(convo) == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)


def test_unknown_template_gets_no_template_and_says_so(tmp_path):
    tok = byte_level_tokenizer(tmp_path, split="gpt-2", vocab_size=300)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    info = write_modelfile(tmp_path / "m.gguf", tok, False, ["<|endoftext|>"], GEN)
    text = (tmp_path / "Modelfile").read_text()
    assert info["family"] is None
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: the run's chat template is none of ChatML, Llama 2, Llama 3, Mistral." in text
    assert 'PARAMETER stop "<|endoftext|>"' in text


def test_llama3_and_mistral_templates_are_recognised(tmp_path):
    tok = byte_level_tokenizer(tmp_path, split="llama-bpe", vocab_size=300)
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tok.chat_template = (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    assert match_family(tok, bos_added=True).name == "llama3"
    assert match_family(tok, bos_added=False).template.startswith("<|begin_of_text|>")
    tok.chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    )
    assert match_family(tok, bos_added=True).name == "mistral"
