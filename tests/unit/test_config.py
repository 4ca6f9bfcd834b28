import pytest

from tests.conftest import run_cli
from trainer.config import dump_yaml, load_recipe, recipe_from_dict
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
    assert "data.format='csvv'" in msg and "auto|messages|alpaca|prompt_completion|text" in msg
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
