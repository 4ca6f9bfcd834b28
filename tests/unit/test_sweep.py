"""The sweep's grammar: values split on commas outside brackets, the grid (nesting keys are alternatives), folder
names, and the plan (every point's recipe validated before anything trains)."""

from __future__ import annotations

import pytest
import yaml

from trainer.errors import UserError
from trainer.sweep import Axis, grid, parse_axes, plan_sweep, point_names, split_values, value_label


def test_split_values_keeps_commas_inside_brackets_braces_and_quotes():
    assert split_values("4,8,16") == ["4", "8", "16"]
    assert split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    assert split_values("{r: 4, alpha: 8},null") == ["{r: 4, alpha: 8}", "null"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("null") == ["null"]
    for bad in ("[a,b", "a]", "4,,8", "'a,b"):
        with pytest.raises(UserError):
            split_values(bad)


def test_parse_axes_refuses_what_it_cannot_mean():
    assert parse_axes(["lora.r=4,8", "lora=null"]) == [Axis("lora.r", ("4", "8")), Axis("lora", ("null",))]
    with pytest.raises(UserError, match="expected key.path=v1,v2"):
        parse_axes(["lora.r"])
    with pytest.raises(UserError, match="given twice"):
        parse_axes(["lora.r=4", "lora.r=8"])
    with pytest.raises(UserError, match="use --name"):
        parse_axes(["output_dir=a,b"])
    with pytest.raises(UserError, match="unclosed bracket"):
        parse_axes(["train.lr=[1e-4"])
    with pytest.raises(UserError, match="not valid YAML"):
        parse_axes(["train.lr=a: b: c"])


def test_grid_crosses_independent_axes_first_slowest():
    points = grid(parse_axes(["lora.r=4,8", "train.lr=1e-4,3e-4"]))
    assert points == [
        [("lora.r", "4"), ("train.lr", "1e-4")],
        [("lora.r", "4"), ("train.lr", "3e-4")],
        [("lora.r", "8"), ("train.lr", "1e-4")],
        [("lora.r", "8"), ("train.lr", "3e-4")],
    ]


def test_nesting_keys_are_alternatives_not_crossed():
    """`lora.r=4,8 lora=null` is r=4, r=8 and a full fine-tune (crossing would give the full fine-tune twice)."""
    assert grid(parse_axes(["lora.r=4,8", "lora=null"])) == [[("lora.r", "4")], [("lora.r", "8")], [("lora", "null")]]
    assert grid(parse_axes(["lora=null", "lora.r=4,8"])) == [[("lora", "null")], [("lora.r", "4")], [("lora.r", "8")]]
    # keys of one section that do not nest are crossed inside the group; other groups are crossed with it
    points = grid(parse_axes(["lora.r=4,8", "lora.alpha=16", "lora=null", "train.lr=1e-4,1e-3"]))
    assert points == [
        [("lora.r", "4"), ("lora.alpha", "16"), ("train.lr", "1e-4")],
        [("lora.r", "4"), ("lora.alpha", "16"), ("train.lr", "1e-3")],
        [("lora.r", "8"), ("lora.alpha", "16"), ("train.lr", "1e-4")],
        [("lora.r", "8"), ("lora.alpha", "16"), ("train.lr", "1e-3")],
        [("lora", "null"), ("train.lr", "1e-4")],
        [("lora", "null"), ("train.lr", "1e-3")],
    ]


def test_point_names_are_readable_and_filesystem_safe():
    axes = parse_axes(["lora.r=4,8", "lora=null", "model.dtype=fp32"])
    assert point_names(grid(axes), axes) == ["lora.r=4", "lora.r=8", "lora=null"]  # single-valued axes left out
    axes = parse_axes(["lora.target_modules=[q_proj,v_proj],all-linear", "train.lr=1e-4,2e-4"])
    assert point_names(grid(axes), axes) == [
        "lora.target_modules=q_proj+v_proj,train.lr=1e-4",
        "lora.target_modules=q_proj+v_proj,train.lr=2e-4",
        "lora.target_modules=all-linear,train.lr=1e-4",
        "lora.target_modules=all-linear,train.lr=2e-4",
    ]
    assert value_label("/models/SmolLM2-135M/") == "SmolLM2-135M"
    assert value_label("{r: 4}") == "_r__4_"
    # two paths with the same last folder: both names get a hash of their whole value, so they stay apart
    axes = parse_axes(["model.name_or_path=/a/m,/b/m"])
    names = point_names(grid(axes), axes)
    assert len(set(names)) == 2 and all(n.startswith("model.name_or_path=m~") for n in names)
    # one point and nothing varies: the name still says what it is
    axes = parse_axes(["lora=null"])
    assert point_names(grid(axes), axes) == ["lora=null"]


def test_plan_validates_every_point_before_anything_trains(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}, "lora": {"r": 16}}))
    folder, points = plan_sweep(recipe, ["lora.r=4,8", "lora=null"], runs_root=tmp_path / "runs")
    assert folder == tmp_path / "runs" / "demo"  # NAME: the recipe file's stem
    assert [p.name for p in points] == ["lora.r=4", "lora.r=8", "lora=null"]
    assert [p.recipe.lora.r if p.recipe.lora else None for p in points] == [4, 8, None]
    assert [p.recipe.output_dir for p in points] == [str(folder / n) for n in ("lora.r=4", "lora.r=8", "lora=null")]
    with pytest.raises(UserError) as err:
        plan_sweep(recipe, ["lora.r=4,0", "train.lr=-1"], name="x", runs_root=tmp_path)
    lines = str(err.value).splitlines()  # every problem of every point, one line each
    assert [(line.split(": ")[0], line.rsplit(": ", 1)[1]) for line in lines] == [
        ("sweep point lora.r=4", "train.lr=-1.0 must be positive"),
        ("sweep point lora.r=0", "train.lr=-1.0 must be positive"),
        ("sweep point lora.r=0", "lora.r=0 must be at least 1"),
    ]
