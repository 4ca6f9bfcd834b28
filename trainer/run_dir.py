"""The run folder: one type that names every path of a run, and the readers post-training commands use.

    RUN_DIR/
      config.yaml          the resolved recipe                          RunDir.config
      metrics.csv          one row per logged step / eval               RunDir.metrics
      run_summary.json     totals of the run                            RunDir.summary
      tensorboard/         TensorBoard scalars                          RunDir.tensorboard
      checkpoints/         step-N/ folders and `latest` (checkpoint.py) RunDir.checkpoints
      adapter/             final LoRA adapter + tokenizer               RunDir.adapter
      initial_adapter/     PiSSA/OLoRA adapter as initialised           RunDir.initial_adapter
      model/               final full fine-tune + tokenizer             RunDir.model
      merged/              `trainer merge` output                       RunDir.merged
      eval/                `trainer eval` reports                       RunDir.eval
      plots/               PNG plots                                    RunDir.plots
      export/              `trainer export` GGUF files and reports      RunDir.export

Nobody else spells these names; the inside of a checkpoint belongs to `checkpoint.py`, and reading what a run
trained (recipe, adapter or model, tokenizer) for the post-training commands to `artifacts.py`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (nothing is created by building one)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

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


def move_aside(folder: Path, log=print) -> Path:
    """Rename a previous run folder to `NAME.previous-DATE` (nothing on disk is lost); returns the new path."""
    folder = Path(folder)
    aside = folder.parent / f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(folder), aside)
    log(f"the previous run moved to {aside}")
    return aside
