"""trainer.quiet: known harmless library messages are dropped; every other warning still reaches the user."""

from __future__ import annotations

import logging
import subprocess
import sys


def run(code: str, verbose: bool) -> str:
    prog = f"from trainer.quiet import silence_known_noise\nsilence_known_noise({verbose})\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60).stderr


EMIT = """
import logging, warnings
warnings.warn("old argument is deprecated", FutureWarning)
warnings.warn("a real problem", UserWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
"""


def test_known_noise_is_dropped_and_real_warnings_kept():
    err = run(EMIT, verbose=False)
    assert "a real problem" in err and "a real bitsandbytes warning" in err
    assert "Some weights were not initialized" in err
    assert "deprecated" not in err and "kernels-community" not in err


def test_verbose_keeps_everything():
    err = run(EMIT, verbose=True)
    assert "deprecated" in err and "kernels-community" in err and "a real problem" in err


def test_filter_matches_formatted_messages_only_of_its_logger():
    from trainer.quiet import _DropKnown

    f = _DropKnown(r"Setting accelerator to CPU")
    make = lambda msg: logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, (), None)  # noqa: E731
    assert not f.filter(make("Setting accelerator to CPU. If you have GPU ..."))
    assert f.filter(make("ZeRO: gradient overflow"))
