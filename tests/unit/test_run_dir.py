"""trainer.run_dir: what a folder on disk is (a run of ours or not) and what `trainer train` may do with it.
Nothing here writes except `write_marker`; every refusal leaves the folder byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe
from trainer.config import dump_yaml, recipe_from_dict, recipe_hash
from trainer.errors import UserError
from trainer.run_dir import FRESH, NEW, RESTART, RESUME, RunDir, check_output_dir, move_aside


def recipe(tmp_path: Path, out: str = "run", **sections):
    return recipe_from_dict(tiny_recipe("m", tmp_path / "d.jsonl", tmp_path / out, **sections))


def tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(path.rglob("*"))
    }


def make_run(tmp_path: Path, *, finished=True, checkpoints=False, rows=0, marker=True, **sections) -> RunDir:
    r = recipe(tmp_path, **sections)
    run = RunDir(tmp_path / "run")
    if marker:
        run.write_marker(recipe_hash(r))
    run.root.mkdir(exist_ok=True)
    run.config.write_text(dump_yaml(r))
    run.metrics.write_text("step,loss\r\n" + "".join(f"{i},1.0\r\n" for i in range(1, rows + 1)))
    if checkpoints:
        (run.checkpoints / "step-2").mkdir(parents=True)
    if finished:
        run.adapter.mkdir()
        (run.adapter / "adapter_config.json").write_text("{}")
        run.summary.write_text(json.dumps({"preempted": False}))
    return run


def test_missing_empty_and_marker_only_folders_are_new(tmp_path):
    r = recipe(tmp_path)
    assert check_output_dir(RunDir(tmp_path / "run"), r) == NEW
    (tmp_path / "run").mkdir()
    assert check_output_dir(RunDir(tmp_path / "run"), r) == NEW
    RunDir(tmp_path / "run").write_marker("abc")
    assert check_output_dir(RunDir(tmp_path / "run"), r, fresh=True) == NEW
    mark = {"format": 1, "recipe_hash": "abc", "cwd": os.getcwd()}
    assert json.loads((tmp_path / "run" / ".trainer-run").read_text()) == mark


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(UserError, match=r"^output_dir .*/run is a file, not a folder"):
        check_output_dir(RunDir(tmp_path / "run"), recipe(tmp_path))
    with pytest.raises(UserError, match=r"^output_dir .*/run/sub/x: .*/run is a file, not a folder"):
        check_output_dir(RunDir(tmp_path / "run" / "sub" / "x"), recipe(tmp_path))


@pytest.mark.parametrize("fresh", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, fresh):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: config\n")  # a config.yaml of someone else's: not a recipe of ours
    (folder / "metrics.csv").write_text("a,b\n")
    before = tree(folder)
    with pytest.raises(UserError) as err:
        check_output_dir(RunDir(folder), recipe(tmp_path), fresh=fresh)
    assert str(err.value).startswith(
        f"output_dir {folder} exists, is not empty (config.yaml, metrics.csv) and is not a trainer run folder "
        "(no .trainer-run); nothing was written."
    )
    assert ("--fresh moves aside only run folders" in str(err.value)) == fresh
    assert tree(folder) == before


def test_a_run_written_before_the_marker_is_still_a_run(tmp_path):
    run = make_run(tmp_path, marker=False, checkpoints=True)
    assert run.is_run_folder() and check_output_dir(run, recipe(tmp_path)) == RESUME


def test_runs_with_checkpoints_resume_and_fresh_moves_them(tmp_path):
    run = make_run(tmp_path, checkpoints=True)
    assert check_output_dir(run, recipe(tmp_path, lora={"r": 4})) == RESUME  # the checkpoint code decides
    assert check_output_dir(run, recipe(tmp_path), fresh=True) == FRESH
    aside = move_aside(run.root, log=lambda m: None)
    assert not run.root.exists() and (aside / ".trainer-run").is_file()


def test_a_finished_run_of_another_recipe_without_checkpoints_is_refused_with_the_differences(tmp_path):
    run = make_run(tmp_path)
    before = tree(run.root)
    with pytest.raises(UserError) as err:
        check_output_dir(run, recipe(tmp_path, lora={"r": 4}, train={"max_steps": 9}))
    assert str(err.value) == (
        f"output_dir {run.root} holds a finished run of another recipe (lora.r: 8 -> 4; train.max_steps: 4 -> 9) and "
        "no checkpoint to resume from; nothing was written. Set another output_dir, or pass --fresh to move that "
        "run aside and start over"
    )
    with pytest.raises(UserError, match="holds a finished run of this recipe and no checkpoint to resume from"):
        check_output_dir(run, recipe(tmp_path))
    assert tree(run.root) == before


def test_an_unfinished_run_without_checkpoints(tmp_path):
    run = make_run(tmp_path, finished=False, rows=3)
    assert check_output_dir(run, recipe(tmp_path, train={"lr": 5e-4})) == RESTART  # harmless change
    with pytest.raises(UserError, match=r"unfinished run of another recipe \(data\.max_seq_len: 128 -> 64\) that "):
        check_output_dir(run, recipe(tmp_path, data={"max_seq_len": 64}))
    run.metrics.write_text("step,loss\r\n")  # it trained nothing: a breaking change is no loss
    assert check_output_dir(run, recipe(tmp_path, data={"max_seq_len": 64})) == RESTART


def test_post_training_commands_find_the_recipes_relative_paths_from_any_folder(tmp_path, monkeypatch):
    """config.yaml keeps the recipe as written (relative paths are relative to where training ran); the marker
    keeps that folder, and `artifacts.read_recipe` resolves them from anywhere else. Hub ids and built-in
    template names stay as written."""
    import yaml

    from trainer.artifacts import read_recipe

    work = tmp_path / "work"
    (work / "model-x").mkdir(parents=True)
    (work / "d.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    run = RunDir(work / "runs" / "a")
    run.write_marker("hash")
    recipe = {"model": {"name_or_path": "model-x"}, "data": {"path": "d.jsonl", "chat_template": "chatml"}}
    run.config.write_text(yaml.safe_dump({**recipe, "output_dir": "runs/a"}))
    here = read_recipe(run)
    assert (here.model.name_or_path, here.data.path) == ("model-x", "d.jsonl")  # found from here: as written
    monkeypatch.chdir(tmp_path)
    there = read_recipe(RunDir(work / "runs" / "a"))
    assert (there.model.name_or_path, there.data.path) == (str(work / "model-x"), str(work / "d.jsonl"))
    assert there.data.chat_template == "chatml"
    run.config.write_text(yaml.safe_dump({**recipe, "model": {"name_or_path": "org/hub-model"}}))
    assert read_recipe(run).model.name_or_path == "org/hub-model"
