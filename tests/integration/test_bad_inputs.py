"""A corpus of bad inputs, each run through the real CLI (`python -m trainer ...` in its own process).

Every case asserts the exit code (2 unless stated), that stderr is exactly the expected number of lines (one,
unless the case has several problems), each `error: ...` and naming the place (file, line, row, key), that no
traceback is printed, and, where that is the point, that the files on disk are unchanged byte for byte.

Kinds: recipe (types, ranges, keys, YAML, encoding, overrides), output_dir (folders that are not ours, runs of
other recipes), data (paths, types, encodings, content), model (folders, files, hub), checkpoint (manifests that
point outside, special files, state types), post-training (merge/eval/chat/export on runs that cannot serve).

The cases that fail before torch is imported run concurrently from one fixture (a second or so each); the ones
that start torch (accelerator, tokenizer) are marked slow. `CORPUS_TABLE=path` writes the markdown table of
every case and its outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe, write_jsonl

CLI_TIMEOUT = 120  # no case may hang: a FIFO or /dev/zero named somewhere must not block


@dataclass
class Case:
    argv: list
    match: str  # regex every stderr line is searched with (joined by "|" for several lines: each must match one)
    rc: int = 2
    lines: int = 1
    unchanged: list = field(default_factory=list)  # files or folders that must be byte-identical afterwards
    absent: list = field(default_factory=list)  # paths that must not exist afterwards
    env: dict = field(default_factory=dict)


@dataclass
class Ctx:
    """What a case builds its inputs with: its own folder, the tiny model, a small dataset."""

    tmp: Path
    model: Path

    def data(self, name: str = "data.jsonl", n: int = 24) -> Path:
        rows = [{"instruction": f"Say {i}", "input": "", "output": f"Number {i}."} for i in range(n)]
        return write_jsonl(self.tmp / name, rows)

    def raw(self, out: str = "run", **sections) -> dict:
        return tiny_recipe(self.model, self.tmp / "data.jsonl", self.tmp / out, **sections)

    def recipe(self, out: str = "run", name: str = "r.yaml", **sections) -> Path:
        self.data()
        path = self.tmp / name
        path.write_text(yaml.safe_dump(self.raw(out, **sections)))
        return path

    def fake_run(self, out: str = "run", steps=(2, 4), final: bool = True, total: int = 4, **sections) -> Path:
        """A run folder as training leaves it (marker, recipe, metrics, checkpoints, final adapter, summary), with
        tiny stand-in weights: the cases below fail before anything would load them."""
        from safetensors.numpy import save_file

        from trainer import checkpoint
        from trainer.config import dump_yaml, recipe_from_dict, recipe_hash
        from trainer.run_dir import RunDir

        self.data()
        recipe = recipe_from_dict(self.raw(out, **sections))
        run = RunDir(self.tmp / out)
        run.write_marker(recipe_hash(recipe))
        run.config.write_text(dump_yaml(recipe))
        logged = total if final else max(steps, default=0)
        run.metrics.write_text("step,epoch,loss\r\n" + "".join(f"{s},0,2.5\r\n" for s in range(1, logged + 1)))

        def adapter(folder: Path):
            import numpy as np

            folder.mkdir(parents=True)
            save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)}, folder / "a.st")
            (folder / "a.st").rename(folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))

        for step in steps:
            ck = run.checkpoints / f"step-{step}"
            (ck / "accelerate").mkdir(parents=True)
            (ck / "accelerate" / "model.safetensors").write_bytes(b"weights" * 10)
            adapter(ck / "adapter")
            (ck / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": total, "cursor": 0}))
            (ck / "config.yaml").write_text(dump_yaml(recipe))
            checkpoint.write_manifest(ck)
        if steps:
            (run.checkpoints / "latest").write_text(f"step-{max(steps)}\n")
        if final:
            adapter(run.adapter)
            checkpoint.write_manifest(run.adapter)
            run.summary.write_text(json.dumps({"steps": total, "preempted": False}))
        return run.root


CASES: dict[str, tuple[str, bool, object]] = {}


def case(name: str, kind: str, slow: bool = False):
    def register(build):
        CASES[name] = (kind, slow, build)
        return build

    return register


def train(*args) -> list:
    return ["train", *map(str, args)]


# ----------------------------------------------------------------------------------------------- recipes
def _recipe_value(name, section, key, value, pattern, slow=False):
    @case(name, "recipe", slow)
    def build(c: Ctx):
        r = c.recipe(**{section: {key: value}} if section else {})
        if not section:
            raw = yaml.safe_load(r.read_text())
            raw[key] = value
            r.write_text(yaml.safe_dump(raw))
        return Case(train(r), pattern, absent=[c.tmp / "run"])


for _name, _section, _key, _value, _pattern in [
    ("lr not a number", "train", "lr", "fast", r"r\.yaml: train\.lr='fast' is not valid; expected a finite number"),
    ("lr NaN", "train", "lr", float("nan"), r"train\.lr=.*nan.* expected a finite number"),
    ("lr infinite", "train", "lr", float("inf"), r"train\.lr=.*inf.* expected a finite number"),
    ("lr zero", "train", "lr", 0.0, r"train\.lr=0\.0 must be positive"),
    ("epochs a float", "train", "epochs", 1.5, r"train\.epochs=1\.5 is not valid; expected an integer"),
    ("micro batch a bool", "train", "micro_batch_size", True, r"train\.micro_batch_size=True .*an integer"),
    ("grad_accum zero", "train", "grad_accum", 0, r"train\.grad_accum=0 must be at least 1"),
    ("dtype unknown", "model", "dtype", "fp8", r"model\.dtype='fp8' .*one of fp32\|bf16\|fp16"),
    ("attention unknown", "model", "attn_implementation", "flash", r"model\.attn_implementation='flash' is not valid"),
    ("weight decay negative", "train", "weight_decay", -0.1, r"train\.weight_decay=-0\.1 must be >= 0"),
    ("warmup steps negative", "train", "warmup_steps", -5, r"train\.warmup_steps=-5 must be >= 0"),
    ("min lr ratio above 1", "train", "min_lr_ratio", 1.5, r"train\.min_lr_ratio=1\.5 must be in \[0, 1\]"),
    ("adam betas one value", "train", "adam_betas", [0.9], r"train\.adam_betas=\[0\.9\] must be two numbers"),
    ("adam beta2 equal 1", "train", "adam_betas", [0.9, 1.0], r"train\.adam_betas=\[0\.9, 1\.0\] must be two"),
    ("adam betas text", "train", "adam_betas", ["a", "b"], r"train\.adam_betas=\['a', 'b'\] must be two numbers"),
    ("scheduler unknown", "train", "scheduler", "step", r"train\.scheduler='step' .*cosine\|linear\|constant"),
    ("seed negative", "train", "seed", -1, r"train\.seed=-1 must be in \[0, 2\*\*63\)"),
    ("max eval batches zero", "train", "max_eval_batches", 0, r"train\.max_eval_batches=0 must be at least 1"),
    ("temperature zero", "generation", "temperature", 0, r"generation\.temperature=0\.0 must be > 0"),
    ("top_p zero", "generation", "top_p", 0, r"generation\.top_p=0\.0 must be in \(0, 1\]"),
    ("top_p above 1", "generation", "top_p", 1.5, r"generation\.top_p=1\.5 must be in \(0, 1\]"),
    ("lora dropout 1", "lora", "dropout", 1.0, r"lora\.dropout=1\.0 must be in \[0, 1\)"),
    ("lora rank 0", "lora", "r", 0, r"lora\.r=0 must be at least 1"),
    ("lora alpha 0", "lora", "alpha", 0, r"lora\.alpha=0\.0 must be > 0"),
    ("lora targets empty", "lora", "target_modules", [], r"lora\.target_modules=\[\] must be 'all-linear' or a list"),
    ("val fraction 1.2", "data", "val_fraction", 1.2, r"data\.val_fraction=1\.2 must be in \[0, 1\)"),
    ("max_seq_len 4", "data", "max_seq_len", 4, r"data\.max_seq_len=4 is too small"),
    ("columns not names", "data", "columns", {"messages": 5}, r"data\.columns=\{'messages': 5\} .*names to names"),
    ("data path a number", "data", "path", 123, r"data\.path=123 is not valid; expected a string"),
    ("output_dir a number", None, "output_dir", 5, r"output_dir=5 is not valid; expected a string"),
    ("output_dir empty", None, "output_dir", "", r"output_dir is required"),
    ("section not a mapping", None, "data", ["x.jsonl"], r"key 'data' must be a mapping"),
]:
    _recipe_value(_name, _section, _key, _value, _pattern)


def _unknown_key(name, section, key, pattern):
    @case(name, "recipe")
    def build(c: Ctx):
        r = c.recipe()
        raw = yaml.safe_load(r.read_text())
        (raw.setdefault(section, {}) if section else raw)[key] = 1
        r.write_text(yaml.safe_dump(raw))
        return Case(train(r), pattern)


for _name, _section, _key, _pattern in [
    (
        "typo in a key (README example)",
        "train",
        "learning_rat",
        r"unknown key 'train\.learning_rat'; did you mean 'train\.lr'\?",
    ),
    ("HF name at top level", None, "learning_rate", r"unknown key 'learning_rate'; did you mean 'train\.lr'\?"),
    ("key of another section", "model", "lr", r"unknown key 'model\.lr'; did you mean 'train\.lr'\?"),
    ("axolotl name", "train", "gradient_accumulation_steps", r"did you mean 'train\.grad_accum'\?"),
    ("peft name", "lora", "lora_alpha", r"unknown key 'lora\.lora_alpha'; did you mean 'lora\.alpha'\?"),
    ("typo in a section name", None, "modle", r"unknown key 'modle'; did you mean 'model'\?"),
    ("nothing close", "train", "xyzzy", r"unknown key 'train\.xyzzy'; valid keys: train\.adam_betas, "),
]:
    _unknown_key(_name, _section, _key, _pattern)


@case("several problems at once", "recipe")
def _(c: Ctx):
    r = c.recipe(train={"lr": -1, "weight_decay": -1, "scheduler": "nope"})
    return Case(train(r), r"train\.(lr|weight_decay|scheduler)", lines=3)


@case("recipe is a list", "recipe")
def _(c: Ctx):
    (c.tmp / "r.yaml").write_text("- model\n- data\n")
    return Case(train(c.tmp / "r.yaml"), r"r\.yaml: a recipe is a YAML mapping")


@case("recipe YAML syntax error", "recipe")
def _(c: Ctx):
    (c.tmp / "r.yaml").write_text("data: {path: x}\ntrain: [\n")
    return Case(train(c.tmp / "r.yaml"), r"r\.yaml:\d+: not valid YAML")


@case("recipe not UTF-8", "recipe")
def _(c: Ctx):
    (c.tmp / "r.yaml").write_bytes(b"data:\n  path: caf\xe9.jsonl\n")
    return Case(train(c.tmp / "r.yaml"), r"r\.yaml: not UTF-8 text \(byte 0xe9 at byte offset 17\)")


@case("recipe of a type we do not read", "recipe")
def _(c: Ctx):
    (c.tmp / "r.txt").write_text("data: {path: x}\n")
    return Case(train(c.tmp / "r.txt"), r"r\.txt: a \.txt file is not a recipe; recipes are \.yaml/\.yml/\.json")


@case("recipe missing", "recipe")
def _(c: Ctx):
    return Case(train(c.tmp / "nope.yaml"), r"nope\.yaml: recipe file not found")


@case("recipe is a folder", "recipe")
def _(c: Ctx):
    (c.tmp / "r.yaml").mkdir()
    return Case(train(c.tmp / "r.yaml"), r"r\.yaml: is a folder, not a file")


@case("override without =", "recipe")
def _(c: Ctx):
    return Case(train(c.recipe(), "train.lr"), r"override 'train\.lr': expected key\.path=value")


@case("override value not YAML", "recipe")
def _(c: Ctx):
    return Case(train(c.recipe(), "train.lr=[1"), r"override 'train\.lr=\[1': the value is not valid YAML")


@case("override empty key part", "recipe")
def _(c: Ctx):
    return Case(train(c.recipe(), "train..lr=1"), r"override 'train\.\.lr=1': 'train\.\.lr' is not a key path")


@case("override NaN", "recipe")
def _(c: Ctx):
    return Case(train(c.recipe(), "train.max_grad_norm=nan"), r"train\.max_grad_norm=.*expected a finite number")


@case("nf4 without LoRA", "recipe")
def _(c: Ctx):
    return Case(train(c.recipe(lora=None, model={"quantization": "nf4"})), r"model\.quantization=nf4 needs LoRA")


# ----------------------------------------------------------------------------------------------- output_dir
def _tree(path: Path) -> dict:
    """{relative path: sha256 or 'dir'} of everything under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@case("output_dir is a file", "output_dir")
def _(c: Ctx):
    (c.tmp / "run").write_text("my notes\n")
    return Case(train(c.recipe()), r"output_dir .*run is a file, not a folder", unchanged=[c.tmp / "run"])


@case("output_dir under a file", "output_dir")
def _(c: Ctx):
    (c.tmp / "notes").write_text("my notes\n")
    r = c.recipe(out="notes/run")
    return Case(train(r), r"output_dir .*notes/run: .*notes is a file, not a folder", unchanged=[c.tmp / "notes"])


@case("output_dir holds the user's files", "output_dir")
def _(c: Ctx):
    (c.tmp / "run").mkdir()
    (c.tmp / "run" / "config.yaml").write_text("my: own config\n")
    (c.tmp / "run" / "thesis.tex").write_text("\\begin{document}\n")
    return Case(
        train(c.recipe()),
        r"output_dir .*run exists, is not empty \(config\.yaml, thesis\.tex\) and is not a trainer run folder",
        unchanged=[c.tmp / "run"],
    )


@case("--fresh on the user's folder", "output_dir")
def _(c: Ctx):
    (c.tmp / "run").mkdir()
    for i in range(6):
        (c.tmp / "run" / f"photo{i}.jpg").write_bytes(bytes([i]) * 10)
    return Case(
        train(c.recipe(), "--fresh"),
        r"\(photo0\.jpg, .* and 2 more\) .*--fresh moves aside only run folders",
        unchanged=[c.tmp],
    )


@case("finished run of another recipe, checkpoints deleted", "output_dir")
def _(c: Ctx):
    run = c.fake_run(steps=())
    r = c.recipe(lora={"r": 4}, train={"lr": 5e-4})
    return Case(
        train(r),
        r"holds a finished run of another recipe \(lora\.r: 8 -> 4; train\.lr: 0\.001 -> 0\.0005\) and no checkpoint",
        unchanged=[run],
    )


@case("finished run of this recipe, checkpoints deleted", "output_dir")
def _(c: Ctx):
    run = c.fake_run(steps=())
    return Case(train(c.recipe()), r"holds a finished run of this recipe .*nothing to do", unchanged=[run])


@case("unfinished run of another recipe that trained steps", "output_dir")
def _(c: Ctx):
    run = c.fake_run(steps=(), final=False)
    (run / "metrics.csv").write_text("step,epoch,loss\r\n1,0,2.5\r\n2,0,2.4\r\n")
    r = c.recipe(data={"max_seq_len": 96})
    return Case(
        train(r),
        r"holds an unfinished run of another recipe \(data\.max_seq_len: 128 -> 96\) that trained 2 logged step",
        unchanged=[run],
    )


# ----------------------------------------------------------------------------------------------- data
@case("data file missing", "data")
def _(c: Ctx):
    return Case(train(c.recipe(data={"path": str(c.tmp / "nope.jsonl")})), r"data\.path: .*nope\.jsonl not found")


@case("data file of a type we do not read", "data")
def _(c: Ctx):
    (c.tmp / "rows.txt").write_text("hello\n")
    r = c.recipe(data={"path": str(c.tmp / "rows.txt")})
    return Case(train(r), r"rows\.txt: cannot read '\.txt' files; give one of \.json, \.jsonl, .*\.parquet")


@case("data file empty", "data")
def _(c: Ctx):
    (c.tmp / "empty.jsonl").write_text("")
    r = c.recipe(data={"path": str(c.tmp / "empty.jsonl")})
    return Case(train(r), r"empty\.jsonl: file is empty")


@case("data folder without data files", "data")
def _(c: Ctx):
    (c.tmp / "rows").mkdir()
    (c.tmp / "rows" / "notes.md").write_text("x")
    r = c.recipe(data={"path": str(c.tmp / "rows")})
    return Case(train(r), r"rows: folder holds no data file \(it holds notes\.md\); we read \.json, ")


@case("data folder: a bad line in its second file", "data")
def _(c: Ctx):
    (c.tmp / "rows").mkdir()
    write_jsonl(c.tmp / "rows" / "a.jsonl", [{"text": "x"}] * 4)
    (c.tmp / "rows" / "b.jsonl").write_text('{"text": "y"}\n{"text": "y"\n')
    r = c.recipe(data={"path": str(c.tmp / "rows")})
    return Case(train(r), r"rows/b\.jsonl:2: malformed JSON line \(Expecting .,. delimiter, column 13\); fix or remove")


@case("data path is a FIFO (never read)", "data")
def _(c: Ctx):
    os.mkfifo(c.tmp / "pipe.jsonl")
    r = c.recipe(data={"path": str(c.tmp / "pipe.jsonl")})
    return Case(train(r), r"pipe\.jsonl: is a FIFO, not a regular file \(never read\)")


@case("hub dataset id, hub unreachable", "data")
def _(c: Ctx):
    r = c.recipe(data={"path": "someone/some-dataset"})
    return Case(
        train(r),
        r"data\.path: 'someone/some-dataset' is not a local file .*hub cannot be reached \(127\.0\.0\.1: ",
        env={"HF_ENDPOINT": "http://127.0.0.1:9"},
    )


@case("data file not UTF-8", "data", slow=True)
def _(c: Ctx):
    r = c.recipe()
    with (c.tmp / "data.jsonl").open("ab") as fh:
        fh.write(b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
    size = (c.tmp / "data.jsonl").stat().st_size
    return Case(
        train(r), rf"data\.jsonl: not UTF-8 text \(byte 0xe9 at byte offset {size - 32}, line 25\); save it as UTF-8"
    )


@case("data JSON line malformed", "data", slow=True)
def _(c: Ctx):
    r = c.recipe()
    with (c.tmp / "data.jsonl").open("a") as fh:
        fh.write('{"instruction": "x", "output": \n')
    return Case(train(r), r"data\.jsonl:25: malformed JSON line")


@case("every prompt longer than max_seq_len", "data", slow=True)
def _(c: Ctx):
    long = " ".join(["word"] * 200)
    write_jsonl(c.tmp / "long.jsonl", [{"instruction": long, "input": "", "output": "ok"} for _ in range(12)])
    r = c.recipe(data={"path": str(c.tmp / "long.jsonl"), "max_seq_len": 16})
    cache = c.tmp / "cache"
    return Case(
        train(r),
        r"data: all \d+ training samples of .*long\.jsonl lost every target token .*data\.max_seq_len=16",
        env={"TRAINER_CACHE": str(cache)},
        absent=[c.tmp / "run"],
    )


# ----------------------------------------------------------------------------------------------- model
@case("model folder missing", "model")
def _(c: Ctx):
    r = c.recipe(model={"name_or_path": str(c.tmp / "no-model")})
    return Case(train(r), r"model\.name_or_path: .*no-model not found")


@case("model path is a weights file", "model")
def _(c: Ctx):
    r = c.recipe(model={"name_or_path": str(c.model / "model.safetensors")})
    return Case(train(r), r"model\.name_or_path: .*model\.safetensors is a \.safetensors file; give a model folder")


@case("model folder without config.json", "model")
def _(c: Ctx):
    (c.tmp / "m").mkdir()
    r = c.recipe(model={"name_or_path": str(c.tmp / "m")})
    return Case(train(r), r"model\.name_or_path: .*m is not a model folder \(no config\.json\)")


def _model_copy(c: Ctx) -> Path:
    import shutil

    return Path(shutil.copytree(c.model, c.tmp / "m"))


@case("model config.json not JSON", "model")
def _(c: Ctx):
    m = _model_copy(c)
    (m / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }\n')
    r = c.recipe(model={"name_or_path": str(m)})
    return Case(train(r), r"m/config\.json:2: not valid JSON", unchanged=[m])


@case("model config.json not UTF-8", "model")
def _(c: Ctx):
    m = _model_copy(c)
    (m / "config.json").write_bytes(b'{"model_type": "llama", "name": "\xff"}')
    r = c.recipe(model={"name_or_path": str(m)})
    return Case(train(r), r"m/config\.json: not UTF-8 text \(byte 0xff at byte offset 33\)")


@case("model weights truncated", "model")
def _(c: Ctx):
    m = _model_copy(c)
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    r = c.recipe(model={"name_or_path": str(m)})
    return Case(train(r), r"m/model\.safetensors: truncated \(5000 bytes; its header needs \d+\)")


@case("model tokenizer.json not JSON", "model")
def _(c: Ctx):
    m = _model_copy(c)
    (m / "tokenizer.json").write_text("{")
    r = c.recipe(model={"name_or_path": str(m)})
    return Case(train(r), r"m/tokenizer\.json:1: not valid JSON")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch X",))


PICKLE = pickle.dumps(_RunsCode())
"""Unpickling it runs `touch X` in the working folder (the case folder): proof that code ran."""


@case("model weights are a pickle that runs code", "model", slow=True)
def _(c: Ctx):
    m = _model_copy(c)
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(PICKLE)
    r = c.recipe(model={"name_or_path": str(m)})
    return Case(
        train(r),
        r"model\.name_or_path: .*m/pytorch_model\.bin: refused: a pickle that would run code when loaded",
        absent=[c.tmp / "X", c.tmp / "run"],
    )


@case("hub model not cached, hub unreachable", "model")
def _(c: Ctx):
    r = c.recipe(model={"name_or_path": "someone/not-a-cached-model"})
    return Case(
        train(r),
        r"model\.name_or_path: 'someone/not-a-cached-model' is not in the local Hugging Face cache and the hub "
        r"cannot be reached",
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(c.tmp / "hf")},
    )


# ----------------------------------------------------------------------------------------------- checkpoints
def _tamper(ck: Path, rel: str, content) -> None:
    """Change a checkpoint file and rewrite its manifest (someone who can write both)."""
    from trainer import checkpoint

    (ck / rel).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    checkpoint.write_manifest(ck)


def _manifest_entry(ck: Path, rel: str) -> None:
    mf = json.loads((ck / "manifest.json").read_text())
    mf["files"][rel] = {"bytes": 10, "sha256": "0" * 64}
    (ck / "manifest.json").write_text(json.dumps(mf))


@case("--resume: manifest names ../x", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    _manifest_entry(ck, "../step-2/trainer_state.json")
    return Case(
        train(c.recipe(), "--resume", ck),
        r"--resume .*step-4: manifest\.json names '\.\./step-2/trainer_state\.json', a path that leaves the checkpoint",
        unchanged=[run],
    )


@case("--resume: manifest names /dev/zero", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    _manifest_entry(ck, "/dev/zero")
    return Case(
        train(c.recipe(), "--resume", ck),
        r"manifest\.json names '/dev/zero', an absolute path outside the checkpoint folder \(never read\)",
        unchanged=[run],
    )


@case("--resume: symlink out of the checkpoint", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    (c.tmp / "secret.txt").write_text("outside")
    (ck / "accelerate" / "model.safetensors").unlink()
    (ck / "accelerate" / "model.safetensors").symlink_to(c.tmp / "secret.txt")
    return Case(
        train(c.recipe(), "--resume", ck),
        r"accelerate/model\.safetensors is a symlink to .*secret\.txt, outside the checkpoint folder",
    )


@case("--resume: FIFO inside the checkpoint", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    os.mkfifo(ck / "accelerate" / "extra.bin")
    _manifest_entry(ck, "accelerate/extra.bin")
    return Case(train(c.recipe(), "--resume", ck), r"accelerate/extra\.bin is not a regular file \(never read\)")


@case("--resume: trainer_state step is text", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    _tamper(ck, "trainer_state.json", {"step": "4", "cursor": 0})
    return Case(train(c.recipe(), "--resume", ck), r"trainer_state\.json: field step='4' must be an integer >= 0")


@case("--resume: trainer_state wall_time NaN", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    _tamper(ck, "trainer_state.json", b'{"step": 4, "wall_time": NaN}')
    return Case(train(c.recipe(), "--resume", ck), r"field wall_time=nan must be a finite number >= 0")


@case("--resume: trainer_state not UTF-8", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    _tamper(ck, "trainer_state.json", b'{"step": 4, "x": "\xfe"}')
    return Case(
        train(c.recipe(), "--resume", ck), r"trainer_state\.json: not UTF-8 text \(byte 0xfe at byte offset 18\)"
    )


@case("--resume: manifest not UTF-8", "checkpoint", slow=True)
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    (ck / "manifest.json").write_bytes(b'{"files": {"\x80": 1}}')
    return Case(train(c.recipe(), "--resume", ck), r"manifest\.json: not UTF-8 text \(byte 0x80 at byte offset 12\)")


@case("--resume: folder missing", "checkpoint", slow=True)
def _(c: Ctx):
    return Case(train(c.recipe(), "--resume", c.tmp / "nope"), r"--resume .*nope: no such checkpoint folder")


# ----------------------------------------------------------------------------------------------- post-training
@case("merge: path does not exist", "post-training")
def _(c: Ctx):
    return Case(["merge", c.tmp / "nope"], r"nope: no such folder; pass the output_dir of a `trainer train` run")


@case("eval: a folder that is not a run", "post-training")
def _(c: Ctx):
    (c.tmp / "stuff").mkdir()
    (c.tmp / "stuff" / "config.yaml").write_text("hello: world\n")
    return Case(["eval", c.tmp / "stuff"], r"stuff: not a run folder \(no \.trainer-run and config\.yaml\)")


@case("chat: a run that has not saved yet", "post-training")
def _(c: Ctx):
    run = c.fake_run(steps=(), final=False)
    return Case(["chat", run, "--prompt", "hi"], r"run: the run has not saved yet \(no adapter/ and no checkpoint")


@case("merge: final adapter truncated", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return Case(
        ["merge", run],
        r"adapter: adapter_model\.safetensors has 100 bytes, manifest says \d+; the final adapter is damaged, the "
        r"newest verified checkpoint is .*step-4 \(step 4 of 4\): pass --checkpoint .*step-4",
        unchanged=[run],
    )


@case("export: final adapter write interrupted", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    (run / "adapter" / "manifest.json").unlink()
    (run / "run_summary.json").unlink()
    return Case(
        ["export", run], r"adapter: no manifest\.json \(its write was interrupted\); .*--checkpoint", unchanged=[run]
    )


@case("eval: final adapter names /dev/zero", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    _manifest_entry(run / "adapter", "/dev/zero")
    return Case(["eval", run], r"adapter: manifest\.json names '/dev/zero', an absolute path", unchanged=[run])


@case("chat: planted pickle in the final adapter", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    (run / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")
    return Case(["chat", run, "--prompt", "hi"], r"adapter_model\.bin is not in manifest\.json", unchanged=[run])


@case("merge: adapter weights are a pickle that runs code (manifest rewritten)", "post-training", slow=True)
def _(c: Ctx):
    from trainer import checkpoint

    run = c.fake_run()
    (run / "adapter" / "adapter_model.safetensors").unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(PICKLE)
    checkpoint.write_manifest(run / "adapter")  # someone who can also rewrite the manifest
    return Case(
        ["merge", run],
        r"adapter: .*run/adapter/adapter_model\.bin: refused: a pickle that would run code when loaded",
        absent=[c.tmp / "X", run / "merged"],
    )


@case("merge: unfinished run, no checkpoint verifies", "post-training")
def _(c: Ctx):
    run = c.fake_run(steps=(2,), final=False)
    _tamper_only(run / "checkpoints" / "step-2" / "trainer_state.json")
    return Case(["merge", run], r"none of its 1 checkpoint\(s\) verifies \(newest step-2: trainer_state\.json checksum")


def _tamper_only(path: Path) -> None:
    path.write_text(path.read_text().replace("0}", "1}"))


@case("eval --checkpoint missing", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    return Case(["eval", run, "--checkpoint", c.tmp / "nope"], r"--checkpoint .*nope: no such folder")


@case("merge --checkpoint that does not verify", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-2"
    (ck / "accelerate" / "model.safetensors").write_bytes(b"x")
    return Case(["merge", run, "--checkpoint", ck], r"--checkpoint .*step-2: accelerate/model\.safetensors has 1 bytes")


@case("export --out onto the user's file", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    (c.tmp / "mine").mkdir()
    (c.tmp / "mine" / "model.gguf").write_text("precious\n")
    (c.tmp / "mine" / "Modelfile").write_text("FROM mine\n")
    return Case(
        ["export", run, "--gguf", "f16", "--out", c.tmp / "mine" / "model.gguf"],
        r"export --out .*mine/model\.gguf: model\.gguf, Modelfile already exist in .*mine \(nothing is overwritten\)",
        unchanged=[c.tmp / "mine", run],
    )


@case("compare --out: the user's folder", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    (c.tmp / "cmp").mkdir()
    (c.tmp / "cmp" / "compare.md").write_text("my notes\n")
    return Case(
        ["compare", run, "--out", c.tmp / "cmp"],
        r"cmp: holds files that are not a comparison \(compare\.md; no \.trainer-compare\); nothing was written",
        unchanged=[c.tmp / "cmp"],
    )


@case("sweep into the user's folder", "recipe")
def _(c: Ctx):
    (c.tmp / "runs" / "mysweep").mkdir(parents=True)
    (c.tmp / "runs" / "mysweep" / "sweep.json").write_text("{}\n")
    return Case(
        ["sweep", c.recipe(), "lora.r=2,4", "--name", "mysweep", "--runs-root", c.tmp / "runs"],
        r"mysweep: holds files that are not a sweep \(sweep\.json; no \.trainer-sweep\); nothing was written",
        unchanged=[c.tmp / "runs"],
    )


@case("usage error: an unknown verb", "recipe")
def _(c: Ctx):
    return Case(
        ["trian", "x.yaml"], r"^error: trainer: argument command: invalid choice: 'trian' .*see `trainer --help`"
    )


@case("merge --checkpoint of another run", "post-training")
def _(c: Ctx):
    run, other = c.fake_run(), c.fake_run(out="other")
    return Case(
        ["merge", run, "--checkpoint", other / "checkpoints" / "step-4"],
        r"--checkpoint .*other/checkpoints/step-4: not a checkpoint of .*run \(its checkpoints are in",
        unchanged=[run],
    )


@case("chat --checkpoint: a folder that is not a checkpoint", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    ck = run / "checkpoints" / "step-4"
    return Case(
        ["chat", run, "--checkpoint", ck / "accelerate", "--prompt", "x"],
        r"--checkpoint .*accelerate: neither a checkpoint \(no manifest\.json\) nor an adapter folder",
    )


@case("chat --checkpoint: an adapter folder without weights", "post-training")
def _(c: Ctx):
    run = c.fake_run()
    adapter = run / "checkpoints" / "step-4" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    return Case(
        ["chat", run, "--checkpoint", adapter, "--prompt", "x"], r"--checkpoint: .*adapter holds no adapter weights"
    )


@case("merge: full fine-tune that has not finished", "post-training")
def _(c: Ctx):
    run = c.fake_run(steps=(2,), final=False, lora=None)
    return Case(["merge", run], r"run: a full fine-tune has nothing to merge|run: the run has not finished \(newest")


# ----------------------------------------------------------------------------------------------- running them
def run_cli(argv: list, env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "", **env}
    full_env.pop("HF_HUB_OFFLINE") if not full_env["HF_HUB_OFFLINE"] else None
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=full_env,
        cwd=cwd,
    )
    return out, time.perf_counter() - t0


def prepare(name: str, root: Path, model: Path):
    kind, slow, build = CASES[name]
    folder = root / name.replace(" ", "_").replace("/", "_")
    folder.mkdir(parents=True)
    c = build(Ctx(folder, model))
    before = {str(p): _tree(p) for p in c.unchanged}
    return c, folder, before


def outcome(name: str, c: Case, folder: Path, before: dict, out, seconds: float) -> dict:
    return {
        "name": name,
        "kind": CASES[name][0],
        "case": c,
        "rc": out.returncode,
        "stderr": out.stderr,
        "stdout": out.stdout,
        "seconds": seconds,
        "before": before,
        "folder": folder,
    }


def check(result: dict) -> None:
    import re

    c: Case = result["case"]
    err = result["stderr"]
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert result["rc"] == c.rc, (result["rc"], err, result["stdout"][-2000:])
    assert len(lines) == c.lines, lines
    for line in lines:
        assert line.startswith("error: "), line
        assert re.search(c.match, line), (c.match, line)
    for path, tree in result["before"].items():
        assert _tree(Path(path)) == tree, f"{path} changed"
    for path in c.absent:
        assert not Path(path).exists(), f"{path} was created"


FAST = [n for n, (_, slow, _) in CASES.items() if not slow]
SLOW = [n for n, (_, slow, _) in CASES.items() if slow]


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad-inputs")
    prepared = {n: prepare(n, root, tiny_model_dir) for n in FAST}

    def one(name):
        c, folder, before = prepared[name]
        out, seconds = run_cli(c.argv, c.env, folder)
        return name, outcome(name, c, folder, before, out, seconds)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(one, FAST))
    _write_table(results)
    return results


@pytest.mark.parametrize("name", FAST)
def test_bad_input_fails_in_one_line(name, fast_results):
    check(fast_results[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_bad_input_fails_in_one_line_after_torch_starts(name, tmp_path, tiny_model_dir):
    c, folder, before = prepare(name, tmp_path, tiny_model_dir)
    out, seconds = run_cli(c.argv, {"TRAINER_CACHE": str(tmp_path / "cache"), **c.env}, folder)
    result = outcome(name, c, folder, before, out, seconds)
    _write_table({name: result})
    check(result)


def test_corpus_is_large_enough():
    assert len(CASES) >= 60, len(CASES)


def _write_table(results: dict) -> None:
    """Append `| case | kind | exit | line printed |` rows to $CORPUS_TABLE when set."""
    path = os.environ.get("CORPUS_TABLE")
    if not path:
        return
    with open(path, "a") as fh:
        for name, r in results.items():
            line = " / ".join(r["stderr"].strip().splitlines()).replace("|", "\\|")
            line = line.replace(str(r["folder"]) + "/", "").replace(str(r["folder"]), ".")
            fh.write(f"| {name} | {r['kind']} | {r['rc']} | `{line}` |\n")
