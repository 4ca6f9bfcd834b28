"""The run folder: one type that names every path of a run, and the readers post-training commands use.

    RUN_DIR/
      .trainer-run         marks the folder as a run (format, recipe hash)  RunDir.marker
      config.yaml          the resolved recipe                          RunDir.config
      metrics.csv          one row per logged step / eval               RunDir.metrics
      run_summary.json     totals of the run                            RunDir.summary
      tensorboard/         TensorBoard scalars                          RunDir.tensorboard
      checkpoints/         step-N/ folders and `latest` (checkpoint.py) RunDir.checkpoints
      adapter/             final LoRA adapter + tokenizer               RunDir.adapter
      initial_adapter/     PiSSA/OLoRA adapter as initialised           RunDir.initial_adapter
      model/               final full fine-tune + tokenizer             RunDir.model
      merged/              `trainer merge` output                       RunDir.merged
      merged-step-N/       `trainer merge --checkpoint` output          RunDir.merged_from
      eval/                `trainer eval` reports                       RunDir.eval
      plots/               PNG plots                                    RunDir.plots
      export/              `trainer export` GGUF files and reports      RunDir.export

Nobody else spells these names; the inside of a checkpoint belongs to `checkpoint.py`, and reading what a run
trained (recipe, adapter or model, tokenizer) for the post-training commands to `artifacts.py`.

A folder is a run folder when it carries the marker (written when training creates or adopts it), or, for runs
written before the marker existed, a recipe plus checkpoints or results. `check_output_dir` decides, before
anything is written or loaded, what `trainer train` may do with an `output_dir`: nothing a user owns is ever
overwritten, and `--fresh` moves aside only run folders.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

MARKER_FORMAT = 1
"""Version of the run-folder layout the marker vouches for."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (nothing is created by building one)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def marker(self) -> Path:
        return self.root / ".trainer-run"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "run_summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def initial_adapter(self) -> Path:
        """The PiSSA/OLoRA adapter as initialised, before training: what converts the saved adapters."""
        return self.root / "initial_adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def merged_from(self, checkpoint_name: str) -> Path:
        """Where `trainer merge --checkpoint` writes the merge of a checkpoint's adapter (never over merged/)."""
        return self.root / f"merged-{checkpoint_name}"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def merge_report(self) -> Path:
        return self.merged / "merge_report.json"

    @property
    def eval_report(self) -> Path:
        return self.eval / "report.json"

    def exists_as_run(self) -> bool:
        """Whether the folder holds a run's recipe (written at the start of training)."""
        return self.config.is_file()

    def is_run_folder(self) -> bool:
        """Carries the marker, or is a run written before the marker existed: a config.yaml with trainer's sections
        beside checkpoints/, metrics.csv, run_summary.json, adapter/ or model/; or a folder whose checkpoints/
        holds checkpoints of ours (step-N/ with manifest.json and trainer_state.json: copied to resume from)."""
        if self.marker.is_file():
            return True
        steps = self.checkpoints.glob("step-*") if self.checkpoints.is_dir() else []
        if any((c / "manifest.json").is_file() and (c / "trainer_state.json").is_file() for c in steps):
            return True
        if not self.config.is_file() or self.config.is_symlink():
            return False
        try:
            import yaml

            raw = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - anything unreadable is simply not one of our recipes
            return False
        ours = {"model", "lora", "data", "train", "generation", "output_dir"}
        if not isinstance(raw, dict) or not raw or not set(raw) <= ours or "data" not in raw:
            return False
        return any(p.exists() for p in (self.checkpoints, self.metrics, self.summary, self.adapter, self.model))

    def finished(self) -> bool:
        """The run wrote its final artifacts (adapter/ or model/, run_summary.json of an unpreempted end)."""
        if (self.adapter / "adapter_config.json").is_file() or (self.model / "config.json").is_file():
            return True
        try:
            return not json.loads(self.summary.read_text(encoding="utf-8")).get("preempted", False)
        except (OSError, ValueError, AttributeError):
            return False

    def write_marker(self, recipe_hash: str) -> None:
        """Create the folder if needed and mark it as a run of the recipe with this hash (atomic). The marker also
        keeps the folder training ran in (`cwd`): the recipe's relative paths are relative to it."""
        from trainer.files import atomic_write_text

        self.root.mkdir(parents=True, exist_ok=True)
        mark = {"format": MARKER_FORMAT, "recipe_hash": recipe_hash, "cwd": os.getcwd()}
        atomic_write_text(self.marker, json.dumps(mark) + "\n")

    def training_cwd(self) -> Path | None:
        """The folder training ran in (the marker's `cwd`), or None (no marker, or written before it kept one)."""
        try:
            cwd = json.loads(self.marker.read_text()).get("cwd")
        except (OSError, ValueError, AttributeError):
            return None
        return Path(cwd) if isinstance(cwd, str) and cwd else None


NEW, RESUME, FRESH, RESTART = "new", "resume", "fresh", "restart"
"""`check_output_dir` outcomes: a new (missing or empty) folder; a run folder to resume (or to start in, when it
has checkpoints but none verifies: decided by the checkpoint code); `--fresh` on a run folder (moved aside);
an unfinished run with no checkpoint and no trained steps of another recipe (started over in place)."""


def check_output_dir(run: RunDir, recipe, *, fresh: bool = False, resume: str | None = None) -> str:
    """What `trainer train` may do with `run` (NEW, RESUME, FRESH or RESTART), decided before anything is
    written; UserError, one line, when the folder is not ours to write into:

    - a file, or a path under a file;
    - a non-empty folder that is not a run folder (even with --fresh: only run folders are moved aside);
    - a finished run (adapter/, model/ or run_summary.json) with no checkpoint folder to resume from, of another
      recipe (the differences are listed) or of this one (nothing to do);
    - an unfinished run with no checkpoint that trained steps (metrics.csv rows) of a recipe that differs in a
      key a resume could not follow.
    """
    root = run.root
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir {root} is a file, not a folder; set output_dir to a new folder")
    parent = next((p for p in root.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"output_dir {root}: {parent} is a file, not a folder; set output_dir to a new folder")
    if not root.is_dir() or not any(root.iterdir()):
        return NEW
    if not run.is_run_folder():
        names = sorted(p.name for p in root.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise UserError(
            f"output_dir {root} exists, is not empty ({shown}) and is not a trainer run folder (no "
            f"{run.marker.name}); nothing was written. Set output_dir to a new or empty folder"
            + ("; --fresh moves aside only run folders" if fresh else "")
        )
    contents = [p for p in root.iterdir() if p.name != run.marker.name]
    if fresh:
        return FRESH if contents else NEW
    if resume or _checkpoint_folders(run):
        return RESUME
    return restart_or_refuse(run, recipe)


def restart_or_refuse(run: RunDir, recipe) -> str:
    """A run folder with nothing to resume from: RESTART (or NEW when it holds only the marker), else UserError
    (see `check_output_dir`). Also used when a run's checkpoints exist but none verifies."""
    from trainer.checkpoint import recipe_differences
    from trainer.config import to_dict
    from trainer.files import read_yaml_mapping

    if not any(p.name != run.marker.name for p in run.root.iterdir()) or not run.config.exists():
        return NEW  # only the marker (and files put beside it, e.g. the demo's data): no run started here yet
    old = read_yaml_mapping(run.config, "the run's recipe") if run.config.exists() else None
    breaking, harmless = recipe_differences(old, to_dict(recipe)) if old is not None else ([], [])
    where = f"output_dir {run.root}"
    if run.finished():
        if breaking or harmless:
            raise UserError(
                f"{where} holds a finished run of another recipe ({'; '.join(breaking + harmless)}) and no "
                "checkpoint to resume from; nothing was written. Set another output_dir, or pass --fresh to "
                "move that run aside and start over"
            )
        raise UserError(
            f"{where} holds a finished run of this recipe and no checkpoint to resume from; nothing to do. "
            "Pass --fresh to train it again (the previous run is moved aside)"
        )
    if breaking and _metrics_rows(run) > 0:
        raise UserError(
            f"{where} holds an unfinished run of another recipe ({'; '.join(breaking)}) that trained "
            f"{_metrics_rows(run)} logged step(s) and saved no checkpoint; nothing was written. Set another "
            "output_dir, or pass --fresh to move it aside"
        )
    return RESTART


def _checkpoint_folders(run: RunDir) -> bool:
    from trainer.checkpoint import list_checkpoints

    return bool(list_checkpoints(run.root))


def _metrics_rows(run: RunDir) -> int:
    try:
        with run.metrics.open(encoding="utf-8", errors="replace") as fh:
            return max(sum(1 for line in fh if line.strip()) - 1, 0)
    except OSError:
        return 0


def claim_folder(folder: Path, marker: str, what: str, how: str) -> Path:
    """Make `folder` ours for writing `what` (a sweep, a comparison): create it, or take it when it is empty or
    already carries `marker` (a file we write into it the first time); refuse anything else, before writing, in
    one line ending with `how` (what the user can do). Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder for {what}; {how}")
    if folder.is_dir() and not (folder / marker).is_file():
        contents = sorted(p.name for p in folder.iterdir())
        if contents:
            shown = ", ".join(contents[:3]) + (" ..." if len(contents) > 3 else "")
            raise UserError(
                f"{folder}: holds files that are not {what} ({shown}; no {marker}); nothing was written. {how}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()
    return folder


def move_aside(folder: Path, log=print) -> Path:
    """Rename a previous run folder to `NAME.previous-DATE` (nothing on disk is lost); returns the new path."""
    folder = Path(folder)
    aside = folder.parent / f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(folder), aside)
    log(f"the previous run moved to {aside}")
    return aside
