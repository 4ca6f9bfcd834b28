"""The tokenizer a run trains with, decided in one place, and the few rules every encoder of a chat shares.

- `run_tokenizer`: the model's tokenizer with its pad token and chat template decided (the model's own template,
  a built-in of `trainer/templates.py`, or a Jinja file; `data.chat_template`), special tokens added only when the
  recipe asks (`data.add_special_tokens`), and the template's end-of-turn tokens found. It runs at the start of
  a run, so a template that cannot work stops the run before anything is loaded.
- `encode_chat`: a rendered conversation -> token ids: the tokenizer's own tokenization of the whole text in one
  piece, with BOS prepended only when the tokenizer adds one to plain text and the text does not already start
  with it (never twice). Training data, generation and merge's checks all encode through it.
- `end_of_turn_ids` / `stop_token_ids`: the special token(s) that close an assistant turn in the template, and
  the ids every generation stops on (those + eos). `save_tokenizer` records them as the `eos_token_id` list of
  the `generation_config.json` it writes beside the tokenizer (adapter/, model/, merged/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.templates import BUILTIN_NAMES, builtin_template, required_tokens

PROBE = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "General Kenobi."}]
"""The conversation rendered to find where an assistant turn ends (`end_of_turn_ids`)."""


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model folder, `.gguf` file or hub id, as saved (no decisions applied); pad token set to
    eos when it has none (padding is masked by position, so the id only fills)."""
    from transformers import AutoTokenizer

    from trainer.model import load_errors, source_args

    path, extra = source_args(name_or_path, tokenizer_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
    except load_errors() as err:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from '{name_or_path}': {str(err).splitlines()[0]}"
        ) from None
    if tok.pad_token is None and tok.eos_token is not None:  # only an id to fill with; padding is masked by position
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------- encoding
def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of plain text (`tokenizer(text)`, special tokens on)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    key = (bos, len(tokenizer))
    cached = getattr(tokenizer, "_trainer_adds_bos", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    result = len(with_special) > len(plain) and with_special[0] == bos
    tokenizer._trainer_adds_bos = (key, result)
    return result


def _offsets_backend(tokenizer):
    """A copy of the tokenizer's Rust backend without its post-processor (which only adds special tokens, off
    here, and may trim whitespace out of offsets, as GPT-2's ByteLevel one does): same ids, untrimmed offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"the tokenizer ({type(tokenizer).__name__}) has no fast (Rust) version; trainer needs one to map "
            "assistant replies to tokens: save the model's tokenizer.json or convert it with transformers"
        )
    cached = getattr(tokenizer, "_trainer_offsets_backend", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    tokenizer._trainer_offsets_backend = (len(tokenizer), copy)
    return copy


def encode_chat(tokenizer, text: str, with_offsets: bool = False):
    """A rendered conversation (or prompt) -> token ids, as inference feeds it.

    The whole text is tokenized in one piece by the tokenizer itself (special-token strings in it become their
    tokens); BOS is prepended when the tokenizer adds one to plain text and the text does not already start with
    it. With `with_offsets`, returns (ids, offsets): offsets[k] = (start, end) character range of token k in `text`;
    a prepended BOS has None (it is not in the text).
    """
    enc = _offsets_backend(tokenizer).encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, offsets = [tokenizer.bos_token_id, *ids], [None, *offsets]
    return (ids, offsets) if with_offsets else ids


# ----------------------------------------------------------------------------------------------- rendering
class TemplateRefused(UserError):
    """The chat template raised on a conversation (its own message, e.g. roles must alternate)."""


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as the run's chat template writes it. A template that raises becomes `TemplateRefused`
    carrying the template's own message and what to do (no file or row: the caller knows those)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 TemplateError (raise_exception), UndefinedError, TypeError in the template
        message = " ".join(str(err).split()) or type(err).__name__
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        if "system" in roles:
            advice = "set data.fold_system_turn: true to fold the system turn into the first user turn, or "
        else:
            advice = ""
        raise TemplateRefused(
            f"the chat template refused this conversation ({', '.join(map(str, roles))}): {message!r}; "
            f"{advice}fix the conversation or choose another template with data.chat_template"
        ) from None


def common_prefix_len(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share: where two renders of a conversation start to differ."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_ids(tokenizer) -> set[int]:
    """Ids matched as whole strings in text: special tokens and every added token (`<|im_end|>`, `<|eot_id|>`...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) that close an assistant reply in the tokenizer's chat template, in order.

    Found by rendering a two-turn probe conversation: the reply's span is the text the template adds after the
    generation prompt (the same rule the data step trains, `trainer.data.tokenize`), and the end-of-turn tokens
    are the special or added tokens of that span after the reply's text (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `</s>`, `<|end|>` ...). UserError when there is none: generation could not stop on a token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; set data.chat_template (e.g. chatml or plain)")
    try:
        prompt = render_chat(tokenizer, PROBE[:1], add_generation_prompt=True)
        full = render_chat(tokenizer, PROBE, add_generation_prompt=False)
    except TemplateRefused as err:
        raise UserError(f"chat template: cannot render a one-turn user/assistant conversation: {err}") from None
    start = common_prefix_len(prompt, full)
    reply = PROBE[1]["content"]
    found = full.find(reply, start)
    after = found + len(reply) if found >= 0 else start
    ids, offsets = encode_chat(tokenizer, full, with_offsets=True)
    special = _special_ids(tokenizer)
    out = []
    for tid, off in zip(ids, offsets):
        if off is not None and off[0] >= after and off[1] <= len(full) and off[1] > off[0] and tid in special:
            if tid not in out:
                out.append(tid)
    if not out:
        tail = full[after:] if after < len(full) else ""
        raise UserError(
            f"chat template: an assistant turn ends with {tail!r}, which holds no special token, so generation "
            f"could not stop on a token; use a template whose assistant turns end with one (data.chat_template: "
            f"plain ends them with eos {tokenizer.eos_token!r}; chatml with <|im_end|>) or a Jinja file"
        )
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """The ids every generation stops on: the template's end-of-turn tokens, then eos (once each)."""
    out = end_of_turn_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


# ----------------------------------------------------------------------------------------------- the decision
@dataclass
class RunTokenizer:
    """The run's tokenizer and the facts decided with it."""

    tokenizer: object
    template: str
    """Where the chat template came from: `model` (the tokenizer's own), `builtin:NAME`, or a Jinja file's path."""
    end_of_turn: list[int]
    """`end_of_turn_ids(tokenizer)`."""
    stop_ids: list[int]
    """`stop_token_ids(tokenizer)`."""
    new_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the vocabulary for the template (`data.add_special_tokens`); their embedding rows
    are trained (`trainer.model.build_model`)."""

    @property
    def new_token_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(t) for t in self.new_tokens]

    def summary(self) -> dict:
        """What run_summary.json records."""
        tok = self.tokenizer
        return {
            "chat_template": self.template,
            "end_of_turn_ids": self.end_of_turn,
            "end_of_turn_tokens": tok.convert_ids_to_tokens(self.end_of_turn),
            "stop_token_ids": self.stop_ids,
            "bos_added": adds_bos(tok),
            "added_tokens": self.new_tokens,
        }


def is_single_token(tokenizer, token: str) -> bool:
    """Whether `token` is one token of the vocabulary, matched whole in text (a special or added token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return False
    return tokenizer(token, add_special_tokens=False)["input_ids"] == [tid]


def _choose_template(tokenizer, choice: str | None, add_tokens: bool) -> tuple[str, str, list[str]]:
    """(template text, source label, tokens to add) for `data.chat_template` = `choice`."""
    if choice is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return own, "model", []
        if isinstance(own, dict) and own.get("default"):
            return own["default"], "model", []
        choice = "chatml" if all(is_single_token(tokenizer, t) for t in required_tokens("chatml")) else "plain"
    if choice in BUILTIN_NAMES:
        if choice in ("llama2", "mistral") and (tokenizer.bos_token is None or tokenizer.eos_token is None):
            raise UserError(f"data.chat_template={choice} needs a tokenizer with bos and eos tokens; this one has not")
        if choice == "plain" and tokenizer.eos_token is None:
            raise UserError(
                "data.chat_template=plain ends replies with the tokenizer's eos, and this tokenizer has none; "
                "choose a template whose turns end with a token of its vocabulary"
            )
        missing = [t for t in required_tokens(choice) if not is_single_token(tokenizer, t)]
        if missing and not add_tokens:
            raise UserError(
                f"data.chat_template={choice} writes {', '.join(missing)}, which the vocabulary lacks; set "
                f"data.add_special_tokens: true to add them (embeddings resized, their rows trained and saved with "
                f"the run), or choose a template the vocabulary has tokens for (plain ends turns with eos)"
            )
        return builtin_template(choice, adds_bos(tokenizer)), f"builtin:{choice}", missing
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.chat_template={choice!r}: neither a built-in ({', '.join(BUILTIN_NAMES)}) nor a Jinja file"
        )
    try:
        return path.read_text(), str(path), []
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template: cannot read {path}: {err}") from None


def run_tokenizer(name_or_path: str, data=None) -> RunTokenizer:
    """The tokenizer a run trains with, decided once: the model's tokenizer, pad token set, the chat template per
    `data.chat_template` (null: the model's own; without one, `chatml` when `<|im_start|>` and `<|im_end|>` are
    single tokens of the vocabulary, else `plain`, whose assistant turns end with the tokenizer's eos), special
    tokens added when `data.add_special_tokens` asks, and the template's end-of-turn tokens found.

    `data` is the recipe's DataArgs (None: defaults). UserError (one line) for a template that cannot work: an
    unknown name or missing file, tokens the vocabulary lacks, assistant turns that end with no special token.
    """
    tok = load_tokenizer(name_or_path)
    choice = getattr(data, "chat_template", None)
    add = bool(getattr(data, "add_special_tokens", False))
    text, source, missing = _choose_template(tok, choice, add)
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.chat_template = text
    if tok.pad_token is None:
        raise UserError(f"{name_or_path}: the tokenizer has neither a pad nor an eos token to pad with")
    eot = end_of_turn_ids(tok)
    return RunTokenizer(tok, source, eot, stop_token_ids(tok), missing)


def save_tokenizer(tokenizer, folder: Path, generation_config=None) -> None:
    """Write the run's tokenizer (vocabulary, special tokens, chat template) into `folder`, and beside it
    `generation_config.json` whose `eos_token_id` is the list of stop ids (`stop_token_ids`): what transformers'
    generate, the GGUF export and serving engines stop on. `generation_config`: the model's own, kept otherwise."""
    from transformers import GenerationConfig

    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    config = generation_config if generation_config is not None else GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(str(folder))


def read_stop_ids(folder: Path) -> list[int] | None:
    """The `eos_token_id` list of `folder/generation_config.json` (an int is read as a one-item list), or None."""
    f = Path(folder) / "generation_config.json"
    if not f.is_file():
        return None
    value = json.loads(f.read_text()).get("eos_token_id")
    if value is None:
        return None
    return [value] if isinstance(value, int) else list(value)
