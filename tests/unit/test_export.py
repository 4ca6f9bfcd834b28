"""GGUF export: a tiny random Llama and a locally trained byte-level BPE tokenizer go to GGUF and
back through transformers' own GGUF loader, which must give the same logits (up to f16 / q8_0
rounding) and the same token ids."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from trainer.errors import UserError  # noqa: E402
from trainer.export import export_gguf, llama3_rope_factors  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEST_STRINGS = [
    "hello world",
    "The quick brown fox jumps over 13 lazy dogs!",
    "<|im_start|>user\nWhat is a tokenizer?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, tabs\tand\nnewlines  ",
    "unicode: café, naïve, 日本語 🙂",
    "<|endoftext|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "hello"},
]
# Allowed |logits| difference against the float32 original, on a padded batch of 3 strings. The tiny
# model's logits have std ~1 and max ~4-5 (initializer_range 1/sqrt(hidden), see _build_model), and
# the weights themselves are checked to come back exactly as f16 / q8_0 stores them, so these bound
# storage rounding only. Measured (torch 2.13 CPU): f16 max 6e-3 mean 8e-4; q8_0 max 0.20 mean 0.02.
F16_TOLERANCE = 2e-2
F16_MEAN_TOLERANCE = 3e-3
Q8_0_TOLERANCE = 0.5
Q8_0_MEAN_TOLERANCE = 0.06


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _corpus(n_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    words = (
        "the a model token train loss step batch learn rate data set fine tune adapter rank alpha "
        "merge export file weight layer head attention norm value key query cat dog fox jumps over "
        "lazy quick brown hello world what is you are say assistant user system"
    ).split()
    lines = []
    for _ in range(n_lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        if rng.random() < 0.3:
            sentence += f" {rng.randint(0, 999)}"
        lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def _build_model(tokenizer_dir: Path, out_dir: Path, tied: bool, model_type: str = "llama") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # the untied model also pads its vocabulary past the tokenizer, as many real checkpoints do
    vocab_size = len(tokenizer) if tied else (len(tokenizer) + 63) // 64 * 64
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.125,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # norms away from 1 so that a mix-up between them would show in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    return _build_model(tokenizer_dir, tmp_path_factory.mktemp("model"), tied=request.param)


def _inputs(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(TEST_STRINGS[:3], padding=True, return_tensors="pt")
    return batch["input_ids"]


def _roundtrip(model_dir: Path, gguf_path: Path, rounded) -> tuple[float, float]:
    """Load the GGUF back with transformers and compare it with the original.

    Every weight must come back exactly as `rounded(original weight)` (what f16 / q8_0 storage makes
    of it: any mix-up of names, permutation or transposition breaks that), and the config must
    match. Returns (max, mean) absolute logits difference on a padded batch of test strings.
    """
    from transformers import AutoModelForCausalLM

    input_ids = _inputs(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    assert loaded.dtype == torch.float32
    assert loaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
    ):
        assert getattr(loaded.config, key) == pytest.approx(getattr(original.config, key)), key
    assert loaded.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]

    want_weights, got_weights = original.state_dict(), loaded.state_dict()
    assert set(got_weights) == set(want_weights)
    for name, weight in want_weights.items():
        want = rounded(weight) if weight.ndim == 2 else weight  # 1-D tensors are stored in f32
        assert torch.equal(got_weights[name], want), name

    with torch.no_grad():
        want = original(input_ids).logits
        got = loaded(input_ids).logits
    assert want.abs().max() > 1.0  # the comparison means something: logits are not all ~0
    diff = (want - got).abs()
    return float(diff.max()), float(diff.mean())


def _f16(weight: torch.Tensor) -> torch.Tensor:
    return weight.half().float()


def _q8_0(weight: torch.Tensor) -> torch.Tensor:
    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), Q8_0), Q8_0))


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _gguf_dir(tmp_path: Path) -> Path:
    # a folder holding only the .gguf, so that nothing can come from the original tokenizer files
    path = tmp_path / "gguf"
    path.mkdir()
    return path


def test_f16_roundtrip_through_transformers(model_dir, tmp_path):
    out = _gguf_dir(tmp_path) / "model.gguf"
    facts = export_gguf(model_dir, out, "f16")

    tied = json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"]
    assert facts["path"] == str(out) and facts["outtype"] == "f16"
    assert facts["bytes"] == out.stat().st_size > 0
    # token_embd + output_norm + 9 per block (+ output when untied)
    assert facts["tensor_count"] == 2 + 2 * 9 + (0 if tied else 1)
    tensors = _tensors(out)
    assert len(tensors) == facts["tensor_count"]
    assert ("output.weight" in tensors) is (not tied)
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == F16
    assert tensors["blk.1.ffn_down.weight"].tensor_type == F16
    assert tensors["token_embd.weight"].tensor_type == F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == F32
    assert tensors["output_norm.weight"].tensor_type == F32
    assert not list(out.parent.glob("*.partial"))

    diff, mean = _roundtrip(model_dir, out, _f16)
    print(f"f16 ({'tied' if tied else 'untied'}): {facts['bytes']} bytes, |logits diff| max {diff:.3g} mean {mean:.2g}")
    assert diff < F16_TOLERANCE and mean < F16_MEAN_TOLERANCE


def test_q8_0_roundtrip_through_transformers(model_dir, tmp_path):
    out = _gguf_dir(tmp_path) / "model.gguf"
    facts = export_gguf(model_dir, out, "q8_0")
    assert facts["outtype"] == "q8_0" and facts["f16_fallback"] == []

    Q8_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    for name, tensor in _tensors(out).items():
        want = F32 if name.endswith("_norm.weight") else Q8_0
        assert tensor.tensor_type == want, name

    diff, mean = _roundtrip(model_dir, out, _q8_0)
    tied = json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"]
    print(
        f"q8_0 ({'tied' if tied else 'untied'}): {facts['bytes']} bytes, |logits diff| max {diff:.3g} mean {mean:.2g}"
    )
    assert diff < Q8_0_TOLERANCE and mean < Q8_0_MEAN_TOLERANCE


def test_metadata_is_what_llama_cpp_reads(model_dir, tmp_path):
    out = _gguf_dir(tmp_path) / "model.gguf"
    export_gguf(model_dir, out)
    fields = gguf.GGUFReader(out).fields

    def value(key):
        field = fields[key]
        return field.contents()

    config = json.loads((model_dir / "config.json").read_text())
    assert value("general.architecture") == "llama"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert value("llama.context_length") == 256
    assert value("llama.embedding_length") == 64
    assert value("llama.block_count") == 2
    assert value("llama.feed_forward_length") == 128
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 16
    assert value("llama.rope.freq_base") == pytest.approx(100000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert value("llama.vocab_size") == config["vocab_size"]
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config["vocab_size"]
    im_start = tokens.index("<|im_start|>")
    assert types[im_start] == gguf.TokenType.CONTROL
    assert tokens[value("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[value("tokenizer.ggml.padding_token_id")] == "<|im_end|>"
    assert tokens[value("tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    assert value("tokenizer.chat_template") == CHATML_TEMPLATE
    if not config["tie_word_embeddings"]:  # padded vocabulary: rows past the tokenizer are unused
        assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]"
        assert types[-1] == gguf.TokenType.UNUSED


def test_tokenizer_roundtrip_through_transformers(model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = _gguf_dir(tmp_path) / "model.gguf"
    export_gguf(model_dir, out)
    original = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)

    for text in TEST_STRINGS:
        want = original(text)["input_ids"]
        assert loaded(text)["input_ids"] == want, text
        assert loaded.decode(want) == original.decode(want) == text
    im_start = original.convert_tokens_to_ids("<|im_start|>")
    assert loaded("<|im_start|>user")["input_ids"][0] == im_start
    assert loaded.eos_token == original.eos_token == "<|im_end|>"
    assert loaded.pad_token == original.pad_token == "<|im_end|>"
    assert loaded.chat_template == original.chat_template == CHATML_TEMPLATE
    for generation_prompt in (False, True):
        kwargs = {"tokenize": False, "add_generation_prompt": generation_prompt}
        prompt = original.apply_chat_template(MESSAGES, **kwargs)
        assert loaded.apply_chat_template(MESSAGES, **kwargs) == prompt
        assert loaded(prompt)["input_ids"] == original(prompt)["input_ids"]


def test_mistral_without_sliding_window_exports_as_llama(tokenizer_dir, tmp_path):
    model_dir = _build_model(tokenizer_dir, tmp_path / "mistral", tied=False, model_type="mistral")
    out = _gguf_dir(tmp_path) / "model.gguf"
    facts = export_gguf(model_dir, out)
    assert facts["architecture"] == "mistral"
    diff, mean = _roundtrip(model_dir, out, _f16)
    print(f"mistral f16: |logits diff| max {diff:.3g} mean {mean:.2g}")
    assert diff < F16_TOLERANCE and mean < F16_MEAN_TOLERANCE


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = llama3_rope_factors(rope, 500000.0, 64)
    # llama.cpp divides each frequency by its factor
    np.testing.assert_allclose(plain.numpy() / factors, scaled.numpy(), rtol=1e-5)


def test_non_llama_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="llama"):
        export_gguf(tmp_path, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_unknown_outtype_is_refused(tmp_path):
    with pytest.raises(UserError, match="q8_0"):
        export_gguf(tmp_path, tmp_path / "model.gguf", outtype="q4_k")


def test_unrecognised_pre_tokenizer_is_refused(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="pre-tokenizer"):
        export_gguf(copy, tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out" / "model.gguf").exists()


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32():
    from trainer.export.writer import _choose_qtype

    T = gguf.GGMLQuantizationType
    assert _choose_qtype("blk.0.ffn_down.weight", (64, 128), "q8_0") == T.Q8_0
    assert _choose_qtype("blk.0.ffn_down.weight", (64, 100), "q8_0") == T.F16
    assert _choose_qtype("blk.0.attn_norm.weight", (64,), "q8_0") == T.F32
    assert _choose_qtype("blk.0.attn_q.bias", (64,), "f16") == T.F32


def test_exact_types_may_flip_only_near_ties():
    """f16 rounding may flip the top-1 token where the merged model's lead is a near-tie (<= TIE_MARGIN); a flip
    anywhere else fails the check."""
    import numpy as np

    from trainer.export.check import TIE_MARGIN, LogitsComparison, failures

    want = np.array([[1.0, 1.0 + TIE_MARGIN / 2, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    near_tie = want.copy()
    near_tie[0] = [1.0 + TIE_MARGIN, 1.0 + TIE_MARGIN / 2, 0.0]  # the 0.025 lead flips
    c = LogitsComparison()
    c.add(want, near_tie)
    facts = c.facts()
    assert (facts["top1_agree"], facts["positions"], facts["top1_flips_outside_ties"]) == (2, 3, 0)
    hop = {
        "hop": "f16",
        "type": "f16",
        "vs_merged": {**facts, "texts": 1, "texts_tokenized_equal": 1, "prompts": 1, "prompts_rendered_equal": 1},
    }
    assert failures({"hops": [hop]}) == []
    decisive = want.copy()
    decisive[1] = [3.0, 3.5, 0.0]  # a lead of 3.0 lost: not rounding
    c.add(want, decisive)
    hop["vs_merged"].update(c.facts())
    assert failures({"hops": [hop]}) == [
        f"f16: top-1 token differs from the merged model at 1/6 positions where the merged model's lead exceeds "
        f"{TIE_MARGIN} (not a near-tie)"
    ]
    hop["type"] = "q8_0"  # quantized types are scored, not required to agree
    assert failures({"hops": [hop]}) == []
