"""trainer.checkpoint and trainer.state on their own: manifest verification, which checkpoint a resume picks,
pruning, recipe compatibility, RNG as JSON, the global data cursor, and that loading never unpickles code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ALPACA, tiny_recipe
from trainer import checkpoint
from trainer.config import recipe_from_dict
from trainer.errors import UserError
from trainer.loop import advance, make_plan
from trainer.state import TrainState, epoch_order, step_rows


def fake_checkpoint(root: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    folder = root / "checkpoints" / f"step-{step}"
    (folder / "accelerate").mkdir(parents=True)
    (folder / "accelerate" / "model.safetensors").write_bytes(payload)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    checkpoint.write_manifest(folder)
    return folder


# ----------------------------------------------------------------------------------------------- verify
def test_verify_names_what_is_wrong(tmp_path):
    ck = fake_checkpoint(tmp_path, 4)
    weights = ck / "accelerate" / "model.safetensors"
    assert checkpoint.verify(ck) is None

    blob = bytearray(weights.read_bytes())
    blob[100] ^= 0x01  # one bit
    weights.write_bytes(bytes(blob))
    assert checkpoint.verify(ck) == "accelerate/model.safetensors checksum mismatch"

    weights.write_bytes(bytes(blob[:350]))
    assert checkpoint.verify(ck) == "accelerate/model.safetensors has 350 bytes, manifest says 700"

    weights.unlink()
    assert checkpoint.verify(ck) == "accelerate/model.safetensors is missing"

    ck = fake_checkpoint(tmp_path, 6)
    (ck / "accelerate" / "random_states_0.pkl").write_bytes(b"planted")
    assert checkpoint.verify(ck) == (
        "accelerate/random_states_0.pkl is not in manifest.json (not written by this save; never loaded)"
    )

    ck = fake_checkpoint(tmp_path, 8)
    (ck / "manifest.json").write_text('{"files": {"a": ')  # torn write
    assert checkpoint.verify(ck) == "manifest.json is unreadable"
    (ck / "manifest.json").unlink()
    assert checkpoint.verify(ck) == "no manifest.json (incomplete save)"


def test_find_resumable_skips_broken_by_name_ignores_temp_folders_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (root / ".tmp-step-8" / "accelerate").mkdir(parents=True)  # a save killed half-way
    (root / "latest").write_text("step-2\n")  # stale pointer: not trusted
    with (root / "step-6" / "trainer_state.json").open("a") as fh:
        fh.write(" ")
    (root / "step-4" / "manifest.json").unlink()
    logged = []
    assert checkpoint.find_resumable(tmp_path, log=logged.append) == root / "step-2"
    assert logged == [
        f"checkpoint: skipping {root}/step-6: trainer_state.json has 12 bytes, manifest says 11",
        f"checkpoint: skipping {root}/step-4: no manifest.json (incomplete save)",
    ]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-6", "step-4", "step-2"]
    assert checkpoint.find_resumable(tmp_path / "nothing-here") is None


def test_prune_keeps_the_newest_up_to_the_step_just_saved(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 10):
        fake_checkpoint(tmp_path, step)
    (root / ".tmp-step-8").mkdir()
    # Resumed from step-6 because step-10 is broken; step-8 was just saved with keep_last=1. Counting step-10
    # would delete step-8 and leave only the broken one.
    fake_checkpoint(tmp_path, 8)
    checkpoint.prune(root, keep_last=1, upto=8)
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-8"]
    checkpoint.prune(root, keep_last=1, upto=10)
    assert sorted(p.name for p in root.iterdir()) == ["step-10"]


# ----------------------------------------------------------------------------------------------- compatibility
def _saved_recipe(tmp_path, **sections) -> Path:
    from trainer.config import dump_yaml

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.yaml").write_text(dump_yaml(recipe_from_dict(tiny_recipe("m", ALPACA, tmp_path / "a", **sections))))
    return ck


def test_breaking_recipe_changes_refused_in_one_line_listing_all(tmp_path):
    ck = _saved_recipe(tmp_path)
    new = recipe_from_dict(
        tiny_recipe(
            "m", ALPACA, tmp_path / "b", lora={"r": 4}, data={"max_seq_len": 96}, train={"max_steps": 40, "lr": 5e-4}
        )
    )
    with pytest.raises(UserError) as err:
        checkpoint.check_compatible(ck, new)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{ck}: cannot resume, the recipe changed in ways this checkpoint cannot follow: "
        "data.max_seq_len: 128 -> 96; lora.r: 8 -> 4. Restore those values, or start over with --fresh."
    )


def test_harmless_recipe_changes_are_returned_output_dir_ignored(tmp_path):
    ck = _saved_recipe(tmp_path)
    new = recipe_from_dict(
        tiny_recipe(
            "m",
            ALPACA,
            tmp_path / "elsewhere",
            train={
                "max_steps": 40,
                "eval_every": 5,
                "log_every": 3,
                "save_every": 7,
                "micro_batch_size": 1,
                "grad_accum": 4,
            },
        )
    )
    assert checkpoint.check_compatible(ck, new) == [
        "train.eval_every: 2 -> 5",
        "train.grad_accum: 2 -> 4",
        "train.log_every: 1 -> 3",
        "train.max_steps: 4 -> 40",
        "train.micro_batch_size: 2 -> 1",
        "train.save_every: 2 -> 7",
    ]


@pytest.mark.parametrize(
    "sections, line",
    [
        (
            {"lora": None},
            "lora: {'r': 8, 'alpha': 16.0, 'dropout': 0.0, 'target_modules': 'all-linear', 'use_dora': False, "
            "'use_rslora': False, 'init': 'default', 'modules_to_save': None} -> None",
        ),
        ({"lora": {"use_dora": True}}, "lora.use_dora: False -> True"),
        ({"train": {"loraplus_lr_ratio": 16.0}}, "train.loraplus_lr_ratio: None -> 16.0"),
        ({"lora": {"target_modules": ["q_proj"]}}, "lora.target_modules: 'all-linear' -> ['q_proj']"),
        ({"data": {"packing": False}}, "data.packing: True -> False"),
        ({"data": {"hub_split": "validation"}}, "data.hub_split: 'train' -> 'validation'"),
        ({"model": {"name_or_path": "other"}}, "model.name_or_path: 'm' -> 'other'"),
    ],
)
def test_each_breaking_key(tmp_path, sections, line):
    old = recipe_from_dict(tiny_recipe("m", ALPACA, tmp_path / "a"))
    new = recipe_from_dict(tiny_recipe("m", ALPACA, tmp_path / "a", **sections))
    from trainer.config import to_dict

    breaking, harmless = checkpoint.recipe_differences(to_dict(old), to_dict(new))
    assert (breaking, harmless) == ([line], [])


def test_a_checkpoint_from_before_new_recipe_keys_resumes(tmp_path):
    """A checkpoint's config.yaml written before keys were added (lora.use_dora, train.report_to, ...) lacks them:
    they had their defaults then, so their absence is no difference."""
    import yaml

    from trainer.config import to_dict

    recipe = recipe_from_dict(tiny_recipe("m", ALPACA, tmp_path / "a"))
    old = to_dict(recipe)
    for key in ("use_dora", "use_rslora", "init", "modules_to_save"):
        del old["lora"][key]
    del old["train"]["report_to"], old["train"]["loraplus_lr_ratio"]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.yaml").write_text(yaml.safe_dump(old))
    assert checkpoint.check_compatible(ck, recipe) == []
    changed = recipe_from_dict(tiny_recipe("m", ALPACA, tmp_path / "a", lora={"use_dora": True}))
    with pytest.raises(UserError, match="lora.use_dora: False -> True"):
        checkpoint.check_compatible(ck, changed)


# ----------------------------------------------------------------------------------------------- RNG
def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    first = (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.nn.functional.dropout(torch.ones(64), 0.5).tolist(),
    )
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.set_rng_state(saved)
    again = (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.nn.functional.dropout(torch.ones(64), 0.5).tolist(),
    )
    assert again == first


# ----------------------------------------------------------------------------------------------- data cursor
def _plan(n_rows, micro, accum, world):
    recipe = recipe_from_dict(
        tiny_recipe("m", ALPACA, Path("x"), train={"micro_batch_size": micro, "grad_accum": accum, "max_steps": 100})
    )
    return recipe, make_plan(n_rows, recipe, world)


def _step_ids(state, plan, recipe, world):
    """All rows of one step, over every rank, in micro-batch order (what the step trains on)."""
    t = recipe.train
    order = epoch_order(plan.rows, state.data_seed, state.epoch)
    per_rank = [step_rows(order, state.cursor, t.micro_batch_size, t.grad_accum, world, r) for r in range(world)]
    return [i for j in range(t.grad_accum) for r in range(world) for i in per_rank[r][j]]


def test_every_row_once_per_epoch_and_the_step_does_not_depend_on_world_size():
    n = 35  # 9 steps of 4 rows; the last one short (3 rows)
    seen = {}
    for micro, accum, world in [(2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]:
        recipe, plan = _plan(n, micro, accum, world)
        assert plan.rows_per_step == 4 and plan.steps_per_epoch == 9
        state, steps = TrainState(data_seed=7), []
        while state.epoch < 2:
            steps.append((state.epoch, _step_ids(state, plan, recipe, world)))
            advance(state, plan, samples=0, tokens=0, targets=0)
        for epoch in (0, 1):
            rows = [i for e, ids in steps if e == epoch for i in ids]
            assert sorted(rows) == list(range(n))  # no repeats, no gaps
        assert [len(ids) for _, ids in steps[:9]] == [4] * 8 + [3]
        seen[(micro, accum, world)] = steps
    first = next(iter(seen.values()))
    assert all(steps == first for steps in seen.values())  # same rows, same order, any split


def test_resume_mid_epoch_on_another_world_size_continues_with_the_next_unseen_rows():
    n = 35
    recipe1, plan1 = _plan(n, 2, 2, 1)
    state, full = TrainState(data_seed=3), []
    for _ in range(12):
        full.append(_step_ids(state, plan1, recipe1, 1))
        advance(state, plan1, samples=0, tokens=0, targets=0)

    state = TrainState(data_seed=3)
    resumed = []
    for _ in range(5):
        resumed.append(_step_ids(state, plan1, recipe1, 1))
        advance(state, plan1, samples=0, tokens=0, targets=0)
    state = TrainState.from_dict(json.loads(json.dumps({**state.to_dict(), "unknown_key": 1})))  # the checkpoint
    assert (state.step, state.epoch, state.cursor) == (5, 0, 20)
    recipe2, plan2 = _plan(n, 1, 2, 2)  # resumed on 2 processes
    for _ in range(7):
        resumed.append(_step_ids(state, plan2, recipe2, 2))
        advance(state, plan2, samples=0, tokens=0, targets=0)
    assert resumed == full
    assert (state.step, state.epoch, state.cursor) == (12, 1, 12)


# ----------------------------------------------------------------------------------------------- no pickles
@pytest.fixture
def saved_checkpoint(tmp_path, tiny_model_dir):
    """A real checkpoint of a tiny LoRA model after one optimizer step, and a loader into a fresh model."""
    from accelerate.state import AcceleratorState

    from trainer.distributed import build_accelerator
    from trainer.model import build_model
    from trainer.optim import build_optimizer

    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, ALPACA, tmp_path / "run"))

    def fresh(seed):
        AcceleratorState._reset_state(True)
        acc = build_accelerator(grad_accum=1, mixed_precision="no", micro_batch_size=1, max_grad_norm=1.0)
        torch.manual_seed(seed)
        model = build_model(recipe.model, recipe.lora, log=lambda m: None)
        model, opt = acc.prepare(model, build_optimizer(model, recipe.train))
        checkpoint.install_trainable_only_hook(acc)
        return acc, model, opt

    acc, model, opt = fresh(0)
    model(input_ids=torch.arange(3, 19).view(1, -1), labels=torch.arange(3, 19).view(1, -1)).loss.backward()
    opt.step()
    ck = checkpoint.save(acc, model, tmp_path / "run", TrainState(step=1), recipe, log=lambda m: None)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    yield ck, trained, opt.state_dict(), lambda: fresh(1)
    AcceleratorState._reset_state(True)


class Payload:
    """Unpickling it creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_loads_without_pickle_and_round_trips(saved_checkpoint, monkeypatch):
    ck, trained, opt_state, fresh = saved_checkpoint
    files = sorted(json.loads((ck / "manifest.json").read_text())["files"])
    pickled = [f for f in files if not f.endswith((".safetensors", ".json", ".yaml", ".md"))]
    assert pickled == ["accelerate/optimizer.bin"]  # accelerate's random_states_0.pkl was dropped
    assert sorted(load_file(ck / "accelerate/model.safetensors")) == sorted(trained)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda f, *a, **k: loads.append((Path(f).name, k.get("weights_only"))) or real_load(f, *a, **k)
    )
    acc, model, opt = fresh()
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)
    state = checkpoint.load(acc, ck)
    assert state.step == 1
    # accelerate 1.15 passes weights_only=True by default: optimizer.bin, and an attempt at the (deleted, and
    # never needed: ours is rng/rank-0.json) random_states_0.pkl that it tolerates missing.
    assert loads == [("optimizer.bin", True), ("random_states_0.pkl", True)]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    got = opt.state_dict()["state"]
    assert all(torch.equal(got[i]["exp_avg_sq"], opt_state["state"][i]["exp_avg_sq"]) for i in opt_state["state"])


@pytest.mark.parametrize(
    "planted", ["accelerate/optimizer.bin", "accelerate/random_states_0.pkl", "accelerate/custom_checkpoint_0.pkl"]
)
def test_a_pickle_we_did_not_write_never_runs(saved_checkpoint, tmp_path, planted):
    ck, _, _, fresh = saved_checkpoint
    marker = tmp_path / "code-ran"
    torch.save({"state": Payload(marker), "param_groups": []}, ck / planted)
    if planted != "accelerate/optimizer.bin":
        # A file the manifest does not list: the checkpoint is refused as it is.
        assert checkpoint.verify(ck) == f"{planted} is not in manifest.json (not written by this save; never loaded)"
    checkpoint.write_manifest(ck)  # someone who can also rewrite the manifest
    assert checkpoint.verify(ck) is None
    acc, _, _ = fresh()
    if planted == "accelerate/random_states_0.pkl":
        checkpoint.load(acc, ck)  # accelerate reads it with weights_only=True, fails, ignores it; ours is JSON
    else:
        with pytest.raises(Exception) as err:
            checkpoint.load(acc, ck)
        assert "weights_only" in str(err.value) or "custom" in str(err.value).lower(), err.value
    assert not marker.exists()


def test_weights_under_other_names_are_refused_not_silently_skipped(saved_checkpoint):
    """accelerate loads with strict=False (the frozen base is not saved): names that match nothing would
    load nothing and the run would go on from fresh LoRA weights."""
    ck, _, _, fresh = saved_checkpoint
    f = ck / "accelerate/model.safetensors"
    save_file({f"module.{k}": v for k, v in load_file(f).items()}, f)
    checkpoint.write_manifest(ck)
    acc, _, _ = fresh()
    with pytest.raises(
        UserError,
        match=r"model.safetensors: does not match the model: \d+ trainable tensor\(s\) "
        r"missing .* \d+ unknown \['module\.base_model",
    ):
        checkpoint.load(acc, ck)


# ----------------------------------------------------------------------------------------------- whole optimizer state
def test_whole_state_read_from_accelerate_files_loads_bit_for_bit(saved_checkpoint):
    """The path a non-DeepSpeed checkpoint takes into another layout: `read_full_state` names accelerate's indexed
    AdamW state by parameter, `load_full_state` puts it into a fresh model and optimizer; every tensor and the step
    count equal what was saved, and the next AdamW step is the same as after accelerate's own loader."""
    ck, trained, opt_state, fresh = saved_checkpoint
    acc, model, opt = fresh()
    unwrapped = acc.unwrap_model(model)
    full = checkpoint.read_full_state(ck, unwrapped)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    assert sorted(full) == sorted(f"{k}/{n}" for n in names for k in ("master", "exp_avg", "exp_avg_sq", "step"))
    checkpoint.load_full_state(acc, model, opt, full)
    for i, (n, p) in enumerate((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad):
        assert torch.equal(p, trained[n]), n
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state_dict()["state"][i][key], opt_state["state"][i][key]), (n, key)
    assert float(full[f"step/{names[0]}"]) == 1.0

    acc2, model2, opt2 = fresh()
    checkpoint.load(acc2, ck)  # accelerate's own loader
    for m, o in ((model, opt), (model2, opt2)):
        m(input_ids=torch.arange(5, 21).view(1, -1), labels=torch.arange(5, 21).view(1, -1)).loss.backward()
        o.step()
    for (n, a), b in zip(
        ((n, p) for n, p in model.named_parameters() if p.requires_grad),
        (p for p in model2.named_parameters() if p[1].requires_grad),
    ):
        assert torch.equal(a, b[1]), n


def test_whole_state_that_does_not_match_the_model_is_one_line(saved_checkpoint):
    ck, trained, _, fresh = saved_checkpoint
    acc, model, _ = fresh()
    dropped = sorted(trained)[0]
    save_file({k: v for k, v in trained.items() if k != dropped}, ck / "accelerate" / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: no tensor .*lora"):
        checkpoint.read_full_state(ck, acc.unwrap_model(model))
    full = {f"{k}/{n}": v.clone() for n, v in trained.items() for k in ("master", "exp_avg", "exp_avg_sq")}
    full[f"exp_avg/{dropped}"] = torch.zeros(3)
    save_file({**full, **{f"step/{n}": torch.ones(1) for n in trained}}, ck / checkpoint.FULL_OPTIMIZER)
    with pytest.raises(
        UserError, match=rf"full_optimizer\.safetensors: exp_avg/{dropped} is missing or has shape \(3,\)"
    ):
        checkpoint.read_full_state(ck, acc.unwrap_model(model))


# ----------------------------------------------------------------------------------------------- untrusted files
def _name_in_manifest(ck: Path, rel: str) -> None:
    mf = json.loads((ck / "manifest.json").read_text())
    mf["files"][rel] = {"bytes": 1, "sha256": "0" * 64}
    (ck / "manifest.json").write_text(json.dumps(mf))


@pytest.mark.parametrize(
    "rel, problem",
    [
        ("../step-2/trainer_state.json", "a path that leaves the checkpoint folder"),
        ("accelerate/../../x", "a path that leaves the checkpoint folder"),
        ("/dev/zero", "an absolute path outside the checkpoint folder"),
        ("/etc/passwd", "an absolute path outside the checkpoint folder"),
        ("", "not a relative path"),
    ],
)
def test_manifest_paths_are_confined_to_the_checkpoint(tmp_path, rel, problem):
    fake_checkpoint(tmp_path, 2)
    ck = fake_checkpoint(tmp_path, 4)
    _name_in_manifest(ck, rel)
    assert checkpoint.verify(ck) == f"manifest.json names {rel!r}, {problem} (never read)"


def test_special_files_and_symlinks_out_are_never_read(tmp_path):
    import os
    import time

    ck = fake_checkpoint(tmp_path, 4)
    os.mkfifo(ck / "accelerate" / "pipe.bin")  # reading it would block forever
    _name_in_manifest(ck, "accelerate/pipe.bin")
    t0 = time.perf_counter()
    assert checkpoint.verify(ck) == "accelerate/pipe.bin is not a regular file (never read)"
    assert time.perf_counter() - t0 < 5

    ck = fake_checkpoint(tmp_path, 6)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"weights" * 100)
    (ck / "accelerate" / "model.safetensors").unlink()
    (ck / "accelerate" / "model.safetensors").symlink_to(outside)  # same bytes: only the symlink is wrong
    assert checkpoint.verify(ck) == (
        f"accelerate/model.safetensors is a symlink to {outside}, outside the checkpoint folder (never followed)"
    )
    ck = fake_checkpoint(tmp_path, 8)
    (ck / "extra").symlink_to(tmp_path, target_is_directory=True)  # a folder link out, listed or not
    assert checkpoint.verify(ck) == f"extra is a symlink to {tmp_path}, outside the checkpoint folder (never followed)"
    link = tmp_path / "checkpoints" / "step-10"
    link.symlink_to(ck)
    assert checkpoint.verify(link).startswith("is a symlink to ")


@pytest.mark.parametrize(
    "state, problem",
    [
        ({"step": "4"}, "field step='4' must be an integer >= 0"),
        ({"step": -1}, "field step=-1 must be an integer >= 0"),
        ({"step": 4.0}, "field step=4.0 must be an integer >= 0"),
        ({"step": True}, "field step=True must be an integer >= 0"),
        ({"step": 4, "cursor": None}, "field cursor=None must be an integer >= 0"),
        ({"step": 4, "wall_time": float("inf")}, "field wall_time=inf must be a finite number >= 0"),
        ({"step": 4, "wall_time": "1 h"}, "field wall_time='1 h' must be a finite number >= 0"),
        ({"step": 4, "world_size": 0}, "field world_size=0 must be an integer >= 1"),
        ({"step": 4, "recipe_hash": 7}, "field recipe_hash=7 must be a string"),
        ([4], "expected a JSON object, found list"),
    ],
)
def test_trainer_state_is_type_checked(tmp_path, state, problem):
    ck = fake_checkpoint(tmp_path, 4)
    (ck / "trainer_state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(ck)
    assert checkpoint.verify(ck) == f"trainer_state.json: {problem}"
    with pytest.raises(UserError, match=r"trainer_state\.json: " + problem.replace("(", r"\(").replace("[", r"\[")):
        checkpoint.read_state(ck)


def test_unknown_state_keys_are_accepted(tmp_path):
    ck = fake_checkpoint(tmp_path, 4)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4, "data_fingerprint": "abc", "zero_stage": 2}))
    checkpoint.write_manifest(ck)
    assert checkpoint.verify(ck) is None


def test_text_that_is_not_utf8_is_named_with_its_offset(tmp_path):
    ck = fake_checkpoint(tmp_path, 4)
    (ck / "trainer_state.json").write_bytes(b'{"step": 4, "note": "\xc3("}')
    checkpoint.write_manifest(ck)
    assert checkpoint.verify(ck) == "trainer_state.json: not UTF-8 text (byte 0xc3 at byte offset 21); save it as UTF-8"
    (ck / "manifest.json").write_bytes(b'{"files": {}}\xff')
    assert checkpoint.verify(ck) == "manifest.json: not UTF-8 text (byte 0xff at byte offset 13); save it as UTF-8"


# ----------------------------------------------------------------------------------------------- latest
def _latest(root: Path) -> str | None:
    f = root / "latest"
    return f.read_text().strip() if f.exists() else None


def test_latest_names_a_complete_checkpoint_at_every_instant_of_a_resave(tmp_path, monkeypatch):
    """Saving a step that exists already (a rerun after the end): at each rename and removal, `latest` must name
    a checkpoint that exists and verifies."""
    import os
    import shutil

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    (root / "latest").write_text("step-4\n")
    new = root / ".tmp-step-4"
    new.mkdir()
    (new / "trainer_state.json").write_text(json.dumps({"step": 4}))
    checkpoint.write_manifest(new)
    seen = []

    def check(*_):
        name = _latest(root)
        seen.append(name)
        assert name is None or checkpoint.verify(root / name) is None, name

    real_replace, real_rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(os, "replace", lambda a, b: (check(), real_replace(a, b), check()))
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: (check(), real_rmtree(p, **k), check()))
    checkpoint.publish(root, new, root / "step-4")
    assert _latest(root) == "step-4" and checkpoint.verify(root / "step-4") is None
    assert json.loads((root / "step-4" / "trainer_state.json").read_text()) == {"step": 4}  # the new one
    assert "step-2" in seen  # latest stepped back to the other complete checkpoint while step-4 was replaced
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]


def test_latest_follows_the_checkpoint_a_run_resumes_from(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (root / "latest").write_text("step-2\n")  # a kill between a save's rename and its latest update
    checkpoint.point_latest_at(root / "step-6")
    assert _latest(root) == "step-6"
    # --resume step-2: the newer complete checkpoints are kept aside, never resumed or named by latest again
    moved = checkpoint.set_aside_newer(root / "step-2", log=lambda m: None)
    assert [p.name.rsplit("-", 2)[0] for p in moved] == ["superseded-step-6", "superseded-step-4"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-2"]
    assert checkpoint.find_resumable(tmp_path, log=lambda m: None) == root / "step-2"
