"""Known harmless library noise, silenced by default and shown with `trainer -v`.

Each entry is a message we have seen on every run of a supported setup that tells the user nothing they can act
on. Anything else a library warns about (a real warning) still reaches the user. Installed by the CLI before any
library is imported: logger filters stay attached to the logger objects the libraries create later.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

KNOWN_LOG_NOISE = {
    # bitsandbytes on a CPU with AVX512-BF16, without the optional `kernels` package: it falls back to its own
    # kernel (bitsandbytes/backends/cpu/ops.py)
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # DeepSpeed probing for an accelerator on a machine without a GPU (deepspeed/accelerator/real_accelerator.py)
    "DeepSpeed": r"Setting accelerator to CPU|Using device .* for DeepSpeed",
}
"""{logger name: regex of the messages dropped}."""

KNOWN_WARNINGS = [
    (FutureWarning, r""),  # deprecation notices addressed to library authors (transformers, peft, torch)
    (DeprecationWarning, r""),
    (UserWarning, r"None of the inputs have requires_grad=True"),  # torch checkpointing on frozen inputs (LoRA)
    (UserWarning, r"Detected pickle protocol \d+ in the checkpoint"),  # torch refusing a pickle: we say so in one line
]
"""(category, message regex) of `warnings.warn` calls that are dropped."""


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not format is not ours to judge
            return True
        return not self.pattern.search(message)


def silence_known_noise(verbose: bool = False) -> None:
    """Drop `KNOWN_LOG_NOISE`, `KNOWN_WARNINGS` and the weight-loading / shard-writing progress bars of transformers
    and huggingface_hub, unless `verbose`. Call once, before the libraries are imported."""
    if verbose:
        return
    for name, pattern in KNOWN_LOG_NOISE.items():
        logging.getLogger(name).addFilter(_DropKnown(pattern))
    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # transformers' "Loading weights" / "Writing model shards" bars and hub download bars (transformers reads
    # huggingface_hub's switch at import; a log file gets one line per refresh of each bar)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # transformers' logger.warning_advice
    import sys

    if "transformers.utils.logging" in sys.modules:  # already imported (in-process use): switch them off now
        sys.modules["transformers.utils.logging"].disable_progress_bar()
