"""trainer/model.py: `model.attn_implementation: auto` picks what the architecture supports; a kernel the model
cannot run is one line; embeddings grow for tokens the run added."""

import pytest

from tests.families import save_family
from trainer.config import ModelArgs
from trainer.errors import UserError
from trainer.model import load_base


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    return save_family("gemma2", tmp_path_factory.mktemp("gemma2"))


def test_auto_attention_falls_back_to_eager_where_sdpa_is_refused(gemma2_dir):
    import torch

    model = load_base(ModelArgs(name_or_path=str(gemma2_dir)), dtype=torch.float32, quantize=False)
    assert model.config._attn_implementation == "eager"  # Gemma-2 refuses SDPA


def test_unsupported_attention_is_one_line(gemma2_dir):
    import torch

    with pytest.raises(UserError) as err:
        load_base(
            ModelArgs(name_or_path=str(gemma2_dir), attn_implementation="sdpa"), dtype=torch.float32, quantize=False
        )
    message = str(err.value)
    assert message.startswith("model.attn_implementation=sdpa: Gemma2ForCausalLM does not support an attention")
    assert message.endswith("use auto (sdpa where supported, else eager) or eager") and "\n" not in message


def test_vocab_size_grows_the_embeddings(gemma2_dir):
    import torch

    base = load_base(ModelArgs(name_or_path=str(gemma2_dir)), dtype=torch.float32, quantize=False)
    rows = base.get_input_embeddings().weight.shape[0]
    grown = load_base(ModelArgs(name_or_path=str(gemma2_dir)), dtype=torch.float32, quantize=False, vocab_size=rows + 2)
    assert grown.get_input_embeddings().weight.shape[0] == rows + 2
    assert grown.get_output_embeddings().weight.shape[0] == rows + 2
    same = load_base(ModelArgs(name_or_path=str(gemma2_dir)), dtype=torch.float32, quantize=False, vocab_size=rows - 5)
    assert same.get_input_embeddings().weight.shape[0] == rows  # never shrunk
