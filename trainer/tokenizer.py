"""The tokenizer a run trains with, decided in one place: loaded from the model, its pad token and chat template
settled here (never inside the data step), and saved beside every artifact the run writes from here."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
    if tok.pad_token is None:  # only an id to fill with; padding is masked by position, not by this id
        tok.pad_token = tok.eos_token
    return tok


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the fallback one (in place)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def run_tokenizer(name_or_path: str):
    """The tokenizer a run trains with: the model's tokenizer with its pad token and chat template decided."""
    tok = load_tokenizer(name_or_path)
    ensure_chat_template(tok)
    return tok


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Write the run's tokenizer (vocabulary, special tokens, chat template) into `folder`."""
    tokenizer.save_pretrained(str(folder))
