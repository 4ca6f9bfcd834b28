"""The tokenizer of a merged model folder, as the GGUF metadata llama.cpp reads.

Two kinds, recognised from `tokenizer.json` itself (llama.cpp's converter hashes the output of a test
text instead; here the few shapes our supported families use are matched structurally and anything
else is refused, so a file never carries a tokenizer llama.cpp would split differently):

- byte-level BPE (GPT-2, SmolLM/SmolLM2, Llama 3, Qwen2): `tokenizer.ggml.model = "gpt2"` with the
  merges and llama.cpp's pre-tokenizer name for the splitting regex (`tokenizer.ggml.pre`: `gpt-2`,
  `smollm`, `llama-bpe`, `qwen2`; names from llama.cpp's `src/llama-vocab.cpp`);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): `tokenizer.ggml.model = "llama"`
  with one score per token, BYTE tokens `<0xNN>` and `tokenizer.ggml.add_space_prefix`. llama.cpp's
  SPM tokenizer merges, at every step, the adjacent pair whose concatenation is the vocabulary token
  with the highest score; Hugging Face's BPE applies the merge of lowest rank. The score written for
  a token is therefore minus the rank of the first merge that produces it, which makes the two
  orders the same (for a merges list that, like the ones converted from SentencePiece models, holds
  every split of every piece).

Special tokens: bos, eos, unk and pad from the tokenizer; the stop tokens from the folder's
`generation_config.json` (`eos_token_id`, an int or a list: the run's end-of-turn/stop ids), of which
the one the chat template writes at the end of an assistant turn is `tokenizer.ggml.eot_token_id`.
llama.cpp ends generation on eos, eot, eom and tokens it recognises by their text; one more stop id
goes to `eom_token_id`, and any further ones are reported as not stopping llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

# The pre-tokenizer regexes of Llama 3 and Qwen2 tokenizer.json files (what llama.cpp calls `llama-bpe`
# and `qwen2`: the same regex except that Qwen2 splits digits one by one).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPIECE_UNDERLINE = "\u2581"  # ▁


@dataclass
class Vocab:
    """What goes under `tokenizer.*` in the GGUF. Token ids index `tokens`; None means "not written"."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp pre-tokenizer name (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    scores: list[float] | None  # SentencePiece only
    merges: list[str]  # byte-level BPE only
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    eom_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool | None  # SentencePiece only
    chat_template: str | list[dict] | None
    stop_token_ids: list[int] = field(default_factory=list)  # every id generation must stop on
    not_stopping_llama_cpp: list[int] = field(default_factory=list)  # stop ids llama.cpp will not end on

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """Read the tokenizer files of `model_dir` (tokenizer.json, tokenizer_config.json, generation_config.json).

    `vocab_size` is the model's embedding rows: ids past the tokenizer become unused `[PADn]` tokens, as
    llama.cpp's converter writes them. Raises `UserError` for a missing tokenizer.json, a tokenizer kind
    llama.cpp would not reproduce, or a tokenizer id past `vocab_size`.
    """
    import gguf
    from transformers import AutoTokenizer

    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(
            f"GGUF export: {tokenizer_path} is missing; save the tokenizer with the model "
            "(tokenizer.save_pretrained) so the GGUF can carry it."
        )
    try:
        spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"GGUF export: cannot read {tokenizer_path}: {exc}") from exc

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"GGUF export: {tokenizer_path} is a {model.get('type')!r} tokenizer; supported: byte-level BPE "
            "(GPT-2, SmolLM, Llama 3, Qwen2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral)."
        )
    if model.get("byte_fallback"):
        kind, pre, add_space_prefix = "llama", None, _sentencepiece_prefix(spec, tokenizer_path)
    else:
        kind, pre, add_space_prefix = "gpt2", byte_level_pre_name(spec, tokenizer_path), None

    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # saved by the run: its chat template and added tokens

    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(entry["id"]): entry for entry in spec.get("added_tokens") or []}
    for token_id, entry in added.items():
        id_to_token[token_id] = entry["content"]
    if id_to_token and max(id_to_token) >= vocab_size:
        raise UserError(
            f"GGUF export: the tokenizer has token id {max(id_to_token)} but the model's vocab_size is "
            f"{vocab_size}; resize the embeddings before saving."
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        text = id_to_token.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]")  # embedding rows past the tokenizer, as llama.cpp writes them
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _is_byte_token(text):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    if kind == "llama" and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    if kind == "llama":
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
        if missing:
            raise UserError(
                f"GGUF export: {tokenizer_path} uses byte fallback but lacks the byte tokens {missing[:3]}...; "
                "llama.cpp needs all 256 <0xNN> tokens."
            )
    scores = _sentencepiece_scores(tokens, merges) if kind == "llama" else None

    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without_special = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    grew = len(with_special) > len(without_special)
    add_bos = bos_id is not None and grew and with_special[0] == bos_id
    add_eos = eos_id is not None and grew and with_special[-1] == eos_id

    stop_ids = folder_stop_ids(model_dir, tokenizer)
    eot_id = end_of_turn_id(tokenizer, stop_ids)
    extra = [i for i in stop_ids if i not in (eos_id, eot_id)]
    eom_id = extra[0] if extra else None

    chat_template = tokenizer.chat_template
    if isinstance(chat_template, dict):
        chat_template = [{"name": name, "template": template} for name, template in chat_template.items()]
    return Vocab(
        model=kind,
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=scores,
        merges=merges if kind == "gpt2" else [],
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        eot_token_id=eot_id,
        eom_token_id=eom_id,
        unk_token_id=tokenizer.unk_token_id,
        pad_token_id=tokenizer.pad_token_id,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        add_space_prefix=add_space_prefix,
        chat_template=chat_template or None,
        stop_token_ids=stop_ids,
        not_stopping_llama_cpp=extra[1:],
    )


def folder_stop_ids(model_dir: Path, tokenizer) -> list[int]:
    """The ids generation stops on: `generation_config.json`'s `eos_token_id` (int or list, as the run saved it
    with `trainer.tokenizer.save_tokenizer`), in its order, then the tokenizer's eos if the list lacks it."""
    from trainer.tokenizer import read_stop_ids

    path = Path(model_dir) / "generation_config.json"
    try:
        values = read_stop_ids(Path(model_dir)) or []
    except (OSError, ValueError) as exc:
        raise UserError(f"GGUF export: cannot read {path}: {exc}") from None
    ids: list[int] = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"GGUF export: {path}: eos_token_id holds {v!r}; expected token ids (integers).")
        if v not in ids:
            ids.append(v)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def end_of_turn_id(tokenizer, stop_ids: list[int]) -> int | None:
    """The stop id the chat template writes right after an assistant reply (ChatML's `<|im_end|>`, Llama 2's
    `</s>`, Llama 3's `<|eot_id|>`: `trainer.tokenizer.end_of_turn_ids`, the rule training labels with); else
    the first stop id."""
    from trainer.tokenizer import end_of_turn_ids

    try:
        found = end_of_turn_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else []
    except UserError:  # a template that refuses the probe: fall back to the list's order
        found = []
    for token_id in found:
        if token_id in stop_ids:
            return token_id
    return stop_ids[0] if stop_ids else None


def byte_level_pre_name(spec: dict, tokenizer_path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the splitting of a byte-level BPE tokenizer.json.

    Raises `UserError` for a normalizer (other than Qwen2's NFC) or a split llama.cpp is not known to
    reproduce.
    """
    pre_tokenizer = spec.get("pre_tokenizer")
    normalizer = spec.get("normalizer")

    def byte_level(step: dict | None, use_regex: bool) -> bool:
        return (
            step is not None
            and step.get("type") == "ByteLevel"
            and bool(step.get("use_regex", True)) == use_regex
            and not step.get("add_prefix_space", False)
        )

    name = None
    if byte_level(pre_tokenizer, use_regex=True):
        name = "gpt-2"
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        regex = (first.get("pattern") or {}).get("Regex")
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, use_regex=True):
            name = "smollm"  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
        elif first.get("type") == "Split" and byte_level(second, use_regex=False):
            name = {LLAMA3_SPLIT_REGEX: "llama-bpe", QWEN2_SPLIT_REGEX: "qwen2"}.get(regex)
    if name is None:
        raise UserError(
            f"GGUF export: the pre-tokenizer in {tokenizer_path} ({json.dumps(pre_tokenizer)[:200]}) is not one "
            "llama.cpp's byte-level BPE is known to reproduce (GPT-2, SmolLM, Llama 3 or Qwen2 splitting)."
        )
    # Qwen2 normalizes to NFC; llama.cpp does not, which changes nothing for text already in NFC (what
    # llama.cpp's converter accepts too). Any other normalizer would make the GGUF tokenize differently.
    if normalizer is not None and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        raise UserError(
            f"GGUF export: {tokenizer_path} has a normalizer ({normalizer.get('type')}); llama.cpp's byte-level "
            "BPE applies none, so the GGUF would tokenize differently."
        )
    return name


def _sentencepiece_prefix(spec: dict, tokenizer_path: Path) -> bool:
    """`add_space_prefix` for a byte-fallback BPE, from how its tokenizer.json turns spaces into `▁`.

    Accepted: Llama 2's normalizer (Prepend("▁") + Replace(" ", "▁")) with no pre-tokenizer (or a split
    before each `▁`), and a Metaspace pre-tokenizer (Mistral). llama.cpp prepends a space to every text
    fragment that follows a special token (what Prepend does); Metaspace's `prepend_scheme: first` prepends
    only at the very start, which matches llama.cpp without the prefix for the chat prompts these models
    use (they start with the BOS token), so it is written as False.
    """
    normalizer = spec.get("normalizer")
    pre_tokenizer = spec.get("pre_tokenizer")
    steps = (normalizer or {}).get("normalizers") if (normalizer or {}).get("type") == "Sequence" else None
    llama2_normalizer = (
        steps is not None
        and [s.get("type") for s in steps] in (["Prepend", "Replace"], ["Replace"])
        and all(
            s.get("prepend") == SPIECE_UNDERLINE
            if s["type"] == "Prepend"
            else (s.get("pattern") or {}).get("String") == " " and s.get("content") == SPIECE_UNDERLINE
            for s in steps
        )
    )
    split_on_underline = (
        (pre_tokenizer or {}).get("type") == "Split"
        and (pre_tokenizer.get("pattern") or {}).get("String") == SPIECE_UNDERLINE
        and pre_tokenizer.get("behavior") == "MergedWithNext"
    )
    if llama2_normalizer and (pre_tokenizer is None or split_on_underline):
        return steps[0].get("type") == "Prepend"
    if normalizer is None and (pre_tokenizer or {}).get("type") == "Metaspace":
        if pre_tokenizer.get("replacement", SPIECE_UNDERLINE) != SPIECE_UNDERLINE:
            raise UserError(f"GGUF export: {tokenizer_path}: a Metaspace replacement other than '▁' is not supported.")
        if pre_tokenizer.get("split", False):
            raise UserError(
                f"GGUF export: {tokenizer_path}: Metaspace with split=true splits words apart; llama.cpp's "
                "SentencePiece tokenizer does not."
            )
        return pre_tokenizer.get("prepend_scheme", "always") == "always"
    raise UserError(
        f"GGUF export: {tokenizer_path} is a byte-fallback BPE whose normalizer/pre-tokenizer "
        f"({json.dumps(normalizer)[:120]} / {json.dumps(pre_tokenizer)[:120]}) is not Llama 2's or Mistral's; "
        "llama.cpp's SentencePiece tokenizer would split it differently."
    )


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and _is_hex(text[3:5])


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _sentencepiece_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Per-token scores for llama.cpp's SPM tokenizer: minus the rank of the first merge producing the token.

    Tokens no merge produces (single characters, bytes, special and unused tokens) score 0 when they are one
    character or not mergeable text, and rank below every merge otherwise.
    """
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        first_rank.setdefault(left + right, rank)
    floor = -float(len(merges))
    scores = []
    for token_id, text in enumerate(tokens):
        if text in first_rank:
            scores.append(-float(first_rank[text]))
        elif len(text) <= 1 or _is_byte_token(text):
            scores.append(0.0)
        else:
            scores.append(floor - token_id)
    return scores


def add_to_writer(writer, vocab: Vocab) -> None:
    """Write `vocab` as GGUF metadata through a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos_token_id, writer.add_bos_token_id),
        (vocab.eos_token_id, writer.add_eos_token_id),
        (vocab.eot_token_id, writer.add_eot_token_id),
        (vocab.eom_token_id, writer.add_eom_token_id),
        (vocab.unk_token_id, writer.add_unk_token_id),
        (vocab.pad_token_id, writer.add_pad_token_id),
    ):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos_token)
    writer.add_add_eos_token(vocab.add_eos_token)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
