import pytest

from tests.conftest import run_cli
from trainer.config import dump_yaml, load_recipe, merge_sections, recipe_from_dict
from trainer.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_overrides_and_defaults(tmp_path):
    r = load_recipe(write(tmp_path, "data: {path: x.jsonl}\n"), ["train.lr=1e-4", "lora=null", "output_dir=runs/a"])
    assert r.train.lr == 1e-4 and r.lora is None and r.output_dir == "runs/a"
    assert r.train.grad_accum == 4 and r.data.packing is True
    assert load_recipe(write(tmp_path, dump_yaml(r))) == r  # the resolved recipe round-trips


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rat'.*"):
        load_recipe(write(tmp_path, "data: {path: x}\ntrain: {learning_rat: 1}\n"))
    with pytest.raises(UserError, match=r"did you mean 'train.micro_batch_size'"):
        load_recipe(write(tmp_path, "data: {path: x}\ntrain: {micro_batch_sise: 1}\n"))
    with pytest.raises(UserError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_recipe(write(tmp_path, "data: {path: x}\nmodle: {}\n"))


def test_bad_values_name_key_and_allowed(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, "data: {path: x, format: csvv}\ntrain: {scheduler: step, micro_batch_size: two}\n"))
    msg = str(e.value)
    assert "data.format='csvv'" in msg and "auto|messages|sharegpt|alpaca|prompt_completion|text" in msg
    assert "train.scheduler='step'" in msg and "cosine|linear|constant" in msg
    assert "train.micro_batch_size='two'" in msg and "an integer" in msg
    assert len(msg.splitlines()) == 3  # every problem at once, one line each


def test_cross_field_checks():
    with pytest.raises(UserError, match="nf4 needs LoRA"):
        recipe_from_dict({"data": {"path": "x"}, "model": {"quantization": "nf4"}, "lora": None})
    with pytest.raises(UserError, match="data.path is required"):
        recipe_from_dict({})


@pytest.mark.slow
def test_cli_config_error_is_one_line_exit_2(tmp_path):
    p = write(tmp_path, "data: {path: x}\ntrain: {lrr: 1}\n")
    out = run_cli("train", p, expect=2)
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "did you mean 'train.lr'" in out.stderr


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(UserError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "data: {path: x}\ntrain: [\n"))


def test_every_recipe_key_is_documented():
    from dataclasses import fields

    from trainer.config import SECTIONS, Recipe, field_docs

    for cls in [*SECTIONS.values(), Recipe]:
        missing = [f.name for f in fields(cls) if len(field_docs(cls).get(f.name, "")) < 10]
        assert not missing, f"{cls.__name__} fields without a docstring under them: {missing}"


def test_readme_recipe_reference_is_generated_from_the_code():
    """Edit trainer/config.py, then run `python -m trainer.config README.md`."""
    from tests.conftest import ROOT
    from trainer.config import REFERENCE_END, REFERENCE_START, reference_markdown

    text = (ROOT / "README.md").read_text()
    generated = text[text.index(REFERENCE_START) + len(REFERENCE_START) : text.index(REFERENCE_END)]
    assert generated.strip() == reference_markdown().strip()


# ----------------------------------------------------------------------------------------------- did you mean
def test_readme_did_you_mean_example_is_what_the_code_prints(tmp_path):
    """The README quotes the message for `train.learning_rat`; it must be the code's, word for word."""
    import re

    from tests.conftest import ROOT

    quoted = re.search(
        r"\(`(unknown key 'train\.learning_rat'; did you mean '[^']+'\?)`\)", (ROOT / "README.md").read_text()
    )
    assert quoted, "the README's did-you-mean example is gone"
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, "data: {path: x}\ntrain: {learning_rat: 1}\n"))
    assert str(err.value) == f"{tmp_path / 'r.yaml'}: {quoted.group(1)}"


@pytest.mark.parametrize(
    "key, meant",
    [
        ("train.learning_rat", "train.lr"),  # a typo of another tool's name
        ("learning_rate", "train.lr"),  # Hugging Face's name, at the top level
        ("train.learning_rate", "train.lr"),
        ("model.lr", "train.lr"),  # a key of another section
        ("train.batch_size", "train.micro_batch_size"),
        ("train.gradient_accumulation_steps", "train.grad_accum"),
        ("train.num_epochs", "train.epochs"),
        ("lora_r", "lora.r"),
        ("lora.lora_alpha", "lora.alpha"),
        ("data.max_seq_length", "data.max_seq_len"),
        ("train.warmup_step", "train.warmup_steps"),
        ("train.output_dir", "output_dir"),
        ("modle", "model"),
        ("train.xyzzy", None),
    ],
)
def test_suggestions_work_across_sections_and_other_tools_names(key, meant):
    from trainer.config import suggest

    assert suggest(key) == meant


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"lr": float("nan")}}, "train.lr=nan is not valid; expected a finite number"),
        ({"train": {"lr": "inf"}}, "train.lr='inf' is not valid; expected a finite number"),
        (
            {"train": {"max_grad_norm": float("-inf")}},
            "train.max_grad_norm=-inf is not valid; expected a finite number",
        ),
        ({"train": {"weight_decay": -0.01}}, "train.weight_decay=-0.01 must be >= 0"),
        ({"train": {"warmup_steps": -1}}, "train.warmup_steps=-1 must be >= 0 (or null to use warmup_ratio)"),
        ({"train": {"min_lr_ratio": -0.1}}, "train.min_lr_ratio=-0.1 must be in [0, 1]"),
        ({"train": {"adam_betas": [0.9, 0.999, 0.5]}}, "train.adam_betas=[0.9, 0.999, 0.5] must be two numbers"),
        ({"train": {"adam_betas": [-0.1, 0.9]}}, "train.adam_betas=[-0.1, 0.9] must be two numbers, each in [0, 1)"),
        ({"train": {"adam_betas": [True, 0.9]}}, "train.adam_betas=[True, 0.9] must be two numbers"),
        ({"train": {"seed": -3}}, "train.seed=-3 must be in [0, 2**63)"),
        ({"data": {"split_seed": 2**64}}, f"data.split_seed={2**64} must be in [0, 2**63)"),
        ({"generation": {"temperature": -1}}, "generation.temperature=-1.0 must be > 0"),
        ({"generation": {"top_p": 0}}, "generation.top_p=0.0 must be in (0, 1]"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens=0 must be at least 1"),
        ({"model": {"attn_implementation": "flash2"}}, "model.attn_implementation='flash2' is not valid"),
        ({"model": {"name_or_path": " "}}, "model.name_or_path is empty"),
        ({"lora": {"alpha": -16}}, "lora.alpha=-16.0 must be > 0"),
        ({"data": {"columns": {"prompt": ["q"]}}}, "data.columns={'prompt': ['q']} is not valid"),
        ({"data": {"hub_split": ""}}, "data.hub_split is empty"),
        ({"output_dir": 3}, "output_dir=3 is not valid; expected a string"),
    ],
)
def test_every_value_is_range_and_type_checked(sections, message):
    raw = merge_sections({"data": {"path": "x.jsonl"}}, sections)
    with pytest.raises(UserError) as err:
        recipe_from_dict(raw, "r.yaml")
    assert str(err.value).startswith(f"r.yaml: {message}"), str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_accepted_edges():
    r = recipe_from_dict(
        {
            "data": {"path": "x.jsonl"},
            "train": {"min_lr_ratio": 1.0, "warmup_steps": 0, "adam_betas": [0, 0.5], "seed": 0, "weight_decay": 0},
            "generation": {"top_p": 1.0, "temperature": 1e-3},
            "model": {"attn_implementation": "kernels-community/flash-attn"},
        }
    )
    assert r.train.adam_betas == (0, 0.5) and r.model.attn_implementation == "kernels-community/flash-attn"


def test_type_and_range_problems_come_in_one_message_without_repeats(tmp_path):
    with pytest.raises(UserError) as err:
        recipe_from_dict({"data": {"path": 5}, "train": {"lr": "x", "weight_decay": -1}, "lora": {"r": 0}}, "r.yaml")
    assert str(err.value).splitlines() == [
        "r.yaml: data.path=5 is not valid; expected a string",
        "r.yaml: train.lr='x' is not valid; expected a finite number",
        "r.yaml: train.weight_decay=-1.0 must be >= 0",
        "r.yaml: lora.r=0 must be at least 1",
    ]  # no "data.path is required" for the default that stood in for the bad value


def test_overrides_that_are_not_key_value_or_not_yaml(tmp_path):
    r = write(tmp_path, "data: {path: x}\n")
    with pytest.raises(UserError, match=r"^override 'train\.lr=\[1': the value is not valid YAML"):
        load_recipe(r, ["train.lr=[1"])
    with pytest.raises(UserError, match=r"^override '\.lr=1': '\.lr' is not a key path"):
        load_recipe(r, [".lr=1"])
    with pytest.raises(UserError, match=r"^override 'lr': expected key\.path=value"):
        load_recipe(r, ["lr"])


def test_recipe_file_not_utf8_is_named_with_the_byte_offset(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"data: {path: x}\n# \xff\n")
    with pytest.raises(UserError, match=r"r\.yaml: not UTF-8 text \(byte 0xff at byte offset 18\)"):
        load_recipe(p)
    q = tmp_path / "r.toml"
    q.write_text("[data]\n")
    with pytest.raises(UserError, match=r"r\.toml: a \.toml file is not a recipe; recipes are \.yaml/\.yml/\.json"):
        load_recipe(q)
