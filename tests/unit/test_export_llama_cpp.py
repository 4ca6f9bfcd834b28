"""The runtime is the test: tiny models of both tokenizer kinds and a Qwen2 one go to GGUF (f16, q8_0 and a
K-quant from llama.cpp's own quantizer), load in llama.cpp (llama-cpp-python) and must

- tokenize every test text and rendered chat prompt to the Hugging Face tokenizer's ids (exactly);
- render the chat prompts with the template embedded in the GGUF exactly as the run's template does;
- give the merged model's next token at every position (f16: all; q8_0/K-quant: stated counts) within a
  stated logit difference;
- answer greedily through the embedded template and stop on the end-of-turn token ("ok", then stop);
and the K-quant fallback for rows that are not a multiple of 256 is llama.cpp's and is reported.

Tolerances (measured on these models with llama-cpp-python 0.3.36 on x86-64 CPU; their logits have std ~0.8
and are flat, so quantization flips near-ties; the planted reply has a margin of ~5 and must survive):
             max |logit diff|   mean |logit diff|   top-1 agreement        measured (bpe / spm / qwen2)
    f16      < 0.02             < 0.002             all positions          0.003, 5e-4, 100 %
    q8_0     < 0.2              < 0.03              >= 90 % of positions   0.07-0.09, 0.013, 95-99 %
    q4_k_m   < 1.2              < 0.2               >= 65 % of positions   0.66-0.72, 0.11, 73-88 %
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from tests.gguf_models import PROMPTS, REPLY, TRICKY_TEXTS, build_model, hf_greedy  # noqa: E402
from trainer.export import write_gguf  # noqa: E402
from trainer.export.check import LogitsComparison, embedded_formatter, llama_logits, open_llama  # noqa: E402
from trainer.export.quantize import quantize_gguf  # noqa: E402

# outtype -> (max |logit diff|, mean |logit diff|, minimum share of positions with the same top-1 token)
TOLERANCE = {"f16": (0.02, 0.002, 1.0), "q8_0": (0.2, 0.03, 0.9), "q4_k_m": (1.2, 0.2, 0.65)}
KINDS = ["bpe", "spm", "qwen2"]


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """For each kind: the model folder, its HF model and tokenizer, and its GGUFs (f16, q8_0, q4_k_m)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("llama-cpp")
    out = {}
    for kind in KINDS:
        folder = build_model(root / kind, kind)
        files = {t: write_gguf(folder, root / f"{kind}-{t}.gguf", t) for t in ("f16", "q8_0", "q4_k_m")}
        stop = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        out[kind] = {
            "dir": folder,
            "model": AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(folder),
            "files": files,
            "stop": stop if isinstance(stop, list) else [stop],
        }
    return out


def _texts(tokenizer) -> list[str]:
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    whole = [
        tokenizer.apply_chat_template(p + [{"role": "assistant", "content": REPLY}], tokenize=False) for p in PROMPTS
    ]
    return TRICKY_TEXTS + rendered + whole


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_k_m"])
def test_gguf_runs_in_llama_cpp_like_the_merged_model(built, kind, outtype):
    b = built[kind]
    tok, model, facts = b["tokenizer"], b["model"], b["files"][outtype]
    llm = open_llama(Path(facts["path"]), n_ctx=256, logits_all=True)
    try:
        # tokenization: every text, exactly
        for text in _texts(tok):
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        # BOS: added by llama.cpp exactly when the HF tokenizer adds it
        assert llm.tokenize(b"hello", add_bos=True, special=True) == tok("hello")["input_ids"]
        # the embedded template renders as the run's
        formatter = embedded_formatter(llm)
        for p in PROMPTS:
            assert formatter(messages=p).prompt == tok.apply_chat_template(
                p, tokenize=False, add_generation_prompt=True
            )
        # stop tokens are end-of-generation tokens in llama.cpp
        for i in b["stop"]:
            assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, i), i
        # logits at every position of every rendered conversation
        cmp = LogitsComparison()
        for p in PROMPTS:
            text = tok.apply_chat_template(p + [{"role": "assistant", "content": REPLY}], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            cmp.add(want, llama_logits(llm, ids))
    finally:
        llm.close()
    f = cmp.facts()
    max_diff, mean_diff, min_agree = TOLERANCE[outtype]
    print(
        f"{kind} {outtype}: {facts['bytes']} bytes, top-1 {f['top1_agree']}/{f['positions']}, "
        f"max |diff| {f['max_abs_logit_diff']:.3g}, mean {f['mean_abs_logit_diff']:.3g}"
    )
    assert f["positions"] > 60
    assert f["max_abs_logit_diff"] < max_diff and f["mean_abs_logit_diff"] < mean_diff
    assert f["top1_agree"] >= min_agree * f["positions"]
    if outtype == "f16":
        assert f["top1_agree"] == f["positions"]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_chat_through_the_embedded_template_stops_after_the_reply(built, kind):
    b = built[kind]
    for outtype in ("f16", "q4_k_m"):
        llm = open_llama(Path(b["files"][outtype]["path"]), n_ctx=256, logits_all=False)
        try:
            for p in PROMPTS:
                want_ids, stopped = hf_greedy(b["model"], b["tokenizer"], p, 8, b["stop"])
                assert stopped and b["tokenizer"].decode(want_ids).strip() == REPLY
                out = llm.create_chat_completion(messages=p, max_tokens=8, temperature=0.0, top_k=1, repeat_penalty=1.0)
                choice = out["choices"][0]
                assert choice["message"]["content"].strip() == REPLY, (kind, outtype, p)
                assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 2
        finally:
            llm.close()


def test_k_quant_mix_is_llama_cpps(built):
    facts = built["bpe"]["files"]["q4_k_m"]
    assert facts["source"] == "f32"  # the merged weights are fp32: quantized from an unrounded file
    assert facts["fallback"] == [] and facts["llama_cpp_warnings"] == []
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(facts["path"]).tensors}
    # llama.cpp's q4_k_m mix for 2 blocks: Q4_K, with "more bits" (Q6_K) for output and the last block's
    # attn_v and ffn_down
    assert types["output.weight"] == types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == types["token_embd.weight"] == "Q4_K"
    assert facts["tensor_types"] == {"F32": 5, "Q4_K": 13, "Q6_K": 3}  # 2 norms per block + output_norm
    assert not list(Path(facts["path"]).parent.glob("*source*"))  # the intermediate file is gone


def test_rows_no_k_quant_takes_fall_back_as_llama_cpp_does(tmp_path):
    """hidden 192 and intermediate 320: no 256-block fits a row of 192 or 320 columns."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_model(tmp_path / "odd", "bpe", hidden=192, intermediate=320)
    facts = write_gguf(folder, tmp_path / "odd-q4_k_m.gguf", "q4_k_m")
    fallback = {f["tensor"]: (f["columns"], f["type"]) for f in facts["fallback"]}
    assert len(fallback) == 2 + 2 * 7  # token_embd, output and every block matrix
    assert fallback["blk.0.attn_q.weight"] == (192, "Q5_0")  # Q4_K -> Q5_0
    assert fallback["blk.0.ffn_down.weight"] == (320, "Q5_0")
    assert fallback["blk.1.ffn_down.weight"] == (320, "Q8_0")  # Q6_K -> Q8_0
    assert fallback["blk.1.attn_v.weight"] == (192, "Q8_0")
    assert fallback["output.weight"] == (192, "Q8_0")  # llama.cpp picks Q8_0 for this output directly
    assert sorted(set(t for _, t in fallback.values())) == ["Q5_0", "Q8_0"]
    # llama.cpp's own log says the same, tensor by tensor (output.weight is chosen, not logged as a fallback)
    logged = {w.split()[1]: w.split()[-1].upper() for w in facts["llama_cpp_warnings"]}
    assert logged == {name: t for name, (_, t) in fallback.items() if name != "output.weight"}
    assert (
        "warning: blk.0.attn_q.weight - ncols 192 not divisible by 256 (required for type q4_K) -> falling back to q5_0"
        in facts["llama_cpp_warnings"]
    )
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    llm = open_llama(Path(facts["path"]), n_ctx=256, logits_all=True)
    try:
        text = tok.apply_chat_template(PROMPTS[2], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cmp = LogitsComparison()
        with torch.no_grad():
            cmp.add(model(input_ids=torch.tensor([ids])).logits[0].numpy(), llama_logits(llm, ids))
        out = llm.create_chat_completion(messages=PROMPTS[0], max_tokens=8, temperature=0.0, top_k=1)
    finally:
        llm.close()
    f = cmp.facts()
    print(f"fallback q4_k_m: top-1 {f['top1_agree']}/{f['positions']}, max |diff| {f['max_abs_logit_diff']:.3g}")
    assert f["max_abs_logit_diff"] < 0.6 and f["top1_agree"] >= 0.8 * f["positions"]
    assert out["choices"][0]["message"]["content"].strip() == REPLY and out["choices"][0]["finish_reason"] == "stop"


def test_our_q8_0_is_bit_identical_to_llama_cpps(built, tmp_path):
    """q8_0 is written by us (no runtime needed); llama.cpp's quantizer, from an f32 file, writes the same bytes."""
    folder = built["qwen2"]["dir"]
    f32 = write_gguf(folder, tmp_path / "f32.gguf", "f32")
    theirs = quantize_gguf(Path(f32["path"]), tmp_path / "theirs.gguf", "q8_0")
    ours = {t.name: t for t in gguf.GGUFReader(built["qwen2"]["files"]["q8_0"]["path"]).tensors}
    compared = 0
    for t in gguf.GGUFReader(theirs["path"]).tensors:
        assert ours[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(ours[t.name].data), np.asarray(t.data)), t.name
        compared += t.tensor_type.name == "Q8_0"
    assert compared == 1 + 2 * 7 + 1  # token_embd, 7 matrices per block, output


def test_tied_embeddings_greedy_ids_equal_hf(tmp_path):
    """A tied model (token_embd doubles as the output, as in SmolLM2/Qwen2.5): no planted reply, so compare
    the first 12 greedy tokens one by one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_model(tmp_path / "tied", "qwen2", tied=True)
    facts = write_gguf(folder, tmp_path / "tied-f16.gguf", "f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(facts["path"]).tensors}
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    llm = open_llama(Path(facts["path"]), n_ctx=256, logits_all=False)
    try:
        for p in PROMPTS[:2]:
            want, _ = hf_greedy(model, tok, p, 12, [])
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            got = []
            for token in llm.generate(tok(text, add_special_tokens=False)["input_ids"], temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == 12:
                    break
            assert got == want
    finally:
        llm.close()


def test_mistral_style_metaspace_tokenizer_matches_on_chat_prompts(tmp_path):
    """Mistral's tokenizer.json spells SentencePiece's prefix as Metaspace(prepend_scheme="first"): a "▁" only at
    the very start of the text, none after a special token. llama.cpp prepends after every special token unless
    add_space_prefix is false, so the export writes false: chat prompts (which start with <s>) then tokenize
    exactly as in Hugging Face. Raw text with an added BOS does not (HF prefixes it, llama.cpp cannot): known."""
    from transformers import AutoTokenizer

    folder = build_model(tmp_path / "mistral-like", "spm", hidden=64, intermediate=128)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(folder)
    facts = write_gguf(folder, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(facts["path"]).fields["tokenizer.ggml.add_space_prefix"].contents() is False
    llm = open_llama(Path(facts["path"]), n_ctx=256, logits_all=False)
    try:
        for p in PROMPTS:
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=True)
                == tok(text, add_special_tokens=False)["input_ids"]
            )
        assert llm.tokenize(b"hello world", add_bos=True, special=True) != tok("hello world")["input_ids"]
    finally:
        llm.close()
