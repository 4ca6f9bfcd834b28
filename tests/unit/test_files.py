"""trainer.files: reading files we did not write (encoding, special files, truncated safetensors) and writing
ours atomically; storage errors as one line."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from trainer.errors import UserError
from trainer.files import (
    as_storage_error,
    atomic_write_text,
    check_utf8_file,
    disk_error,
    read_json,
    regular_file_problem,
    safetensors_problem,
)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
@pytest.mark.parametrize(
    "data, byte, offset",
    [(b"abc\xff", 0xFF, 3), ("hé".encode() + b"\xe9x", 0xE9, 3), ("aé".encode() * 3 + b"\xc3", 0xC3, 9)],
)
def test_the_first_bad_byte_is_named_at_any_chunk_size(tmp_path, chunk, data, byte, offset):
    f = tmp_path / "t.jsonl"
    f.write_bytes(data)
    with pytest.raises(UserError) as err:
        check_utf8_file(f, chunk=chunk)
    assert str(err.value) == f"{f}: not UTF-8 text (byte 0x{byte:02x} at byte offset {offset}); save it as UTF-8"


def test_read_json_names_line_and_bom_is_fine(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{\n "a": 1,\n}')
    with pytest.raises(UserError, match=r"x\.json:3: not valid JSON"):
        read_json(f)
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_json(f) == {"a": 1}


def test_special_files_are_named_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert regular_file_problem(tmp_path / "pipe") == "is a FIFO, not a regular file (never read)"
    assert regular_file_problem(tmp_path) == "is a folder, not a file"
    assert regular_file_problem(tmp_path / "nope") == "no such file"
    if os.path.exists("/dev/zero"):
        assert regular_file_problem("/dev/zero") == "is a device, not a regular file (never read)"


def test_truncated_safetensors_are_found_from_the_header(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((16, 16), np.float32)}, f)
    assert safetensors_problem(f) is None
    whole = f.read_bytes()
    f.write_bytes(whole[:-1])
    assert safetensors_problem(f) == f"truncated ({len(whole) - 1} bytes; its header needs {len(whole)})"
    f.write_bytes(whole[:20])
    assert safetensors_problem(f).startswith("truncated or not a .safetensors file (header of ")
    f.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    assert safetensors_problem(f) == "corrupt .safetensors header (not JSON)"
    f.write_bytes(b"abc")
    assert safetensors_problem(f).startswith("truncated (3 bytes")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("old")
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_storage_errors_as_one_line(tmp_path):
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))
    line = disk_error(err, needed=3 << 20)
    assert line.startswith(f"{tmp_path}/x: No space left on device; ") and line.endswith(" free, about 3.0 MiB needed")
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))
    assert disk_error(ro) == f"{tmp_path}: Read-only file system"
    # what safetensors and torch.save raise on a full disk
    found = as_storage_error(RuntimeError("I/O error: No space left on device (os error 28)"), tmp_path)
    assert found.errno == errno.ENOSPC and found.filename == str(tmp_path)
    assert as_storage_error(RuntimeError("file write failed"), tmp_path) is None  # the folder is writable
    assert as_storage_error(KeyError("x"), tmp_path) is None


def test_writes_through_a_temp_name_no_user_owns(tmp_path):
    """atomic_write_text (and `trainer data --jsonl`) write a hidden `.NAME.tmp-PID` and rename it: a user's own
    `NAME.tmp` beside the target is left as it was."""
    from trainer.files import atomic_write_text, temp_beside

    (tmp_path / "out.jsonl.tmp").write_text("precious\n")
    atomic_write_text(tmp_path / "out.jsonl", "new\n")
    assert (tmp_path / "out.jsonl.tmp").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.tmp"]
    first = temp_beside(tmp_path / "x")
    first.write_text("")
    assert temp_beside(tmp_path / "x") != first and first.name.startswith(".x.tmp-")
