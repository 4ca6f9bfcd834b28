"""Reading files we did not write, and writing ours so a kill never leaves half a file.

Everything a user or another program can put on disk (recipes, data, checkpoints, run folders, model folders)
is untrusted: each reader here turns what can go wrong into one `UserError` line that names the file.

- `read_text`: UTF-8 text; anything else is named with the byte offset of the first bad byte.
- `read_json` / `read_yaml_mapping`: the same, plus the line of a syntax error.
- `regular_file_problem`: never read a FIFO, a device (`/dev/zero`) or a socket: they can block forever.
- `safetensors_problem`: a truncated or corrupt .safetensors file, found from its header without loading it.
- `atomic_write_text`: temp file, fsync, rename: readers see the old file or the new one, never a torn one.
- `disk_error`: ENOSPC / EROFS / EDQUOT / EACCES as one line with the path and the free space.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

from trainer.errors import UserError

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""OSError numbers that mean "this storage cannot take the write": full, over quota, read-only, not allowed."""


def utf8_problem(data: bytes) -> str | None:
    """None if `data` is UTF-8, else 'not UTF-8 text (byte 0xNN at byte offset K)'. A UTF-8 byte-order mark is
    fine (Python's utf-8-sig reads it)."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset {err.start}); save it as UTF-8"


def read_text(path: Path, what: str = "") -> str:
    """The file as text. UserError naming the file (and `what` it is) when it is missing, not a regular file, or
    not UTF-8 (with the byte offset of the first bad byte)."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}{_what(what)}")
    data = path.read_bytes()
    problem = utf8_problem(data)
    if problem:
        raise UserError(f"{path}: {problem}{_what(what)}")
    return data.decode("utf-8-sig")


def check_utf8_file(path: Path, chunk: int = 1 << 22) -> None:
    """Stream a (possibly large) text file and raise UserError at the first byte that is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with Path(path).open("rb") as fh:
        while True:
            block = fh.read(chunk)
            held = len(decoder.getstate()[0])  # an incomplete character kept from the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:  # err.start counts from the held bytes + this block
                raise UserError(
                    f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte offset "
                    f"{offset - held + err.start}); save it as UTF-8"
                ) from None
            if not block:
                return
            offset += len(block)


def read_json(path: Path, what: str = ""):
    """Parsed JSON; UserError naming the file and the line of a syntax error (or the byte offset of non-UTF-8)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}){_what(what)}") from None


def read_yaml_mapping(path: Path, what: str = "") -> dict:
    """A YAML file whose top level is a mapping; UserError naming the file and line otherwise."""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err}){_what(what)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping, found {type(data).__name__}{_what(what)}")
    return data


def regular_file_problem(path: Path) -> str | None:
    """None for an existing regular file (symlinks followed), else what it is: missing, a folder, a FIFO, a
    device... Reading a FIFO or /dev/zero would block or never end, so callers check before they open."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
    return f"is {kind}, not a regular file (never read)"


def safetensors_problem(path: Path) -> str | None:
    """None if `path` is a complete .safetensors file as far as its header tells, else what is wrong.

    Format (github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; every end offset
    must lie within the file. Reads the header only: cheap for any model size."""
    problem = regular_file_problem(path)
    if problem:
        return problem
    size = os.path.getsize(path)
    if size < 8:
        return f"truncated ({size} bytes; a .safetensors file starts with an 8-byte header size)"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            return f"truncated or not a .safetensors file (header of {n} bytes, file of {size})"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt .safetensors header (not JSON)"
    if not isinstance(header, dict):
        return "corrupt .safetensors header"
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            return f"corrupt .safetensors header (tensor {name!r})"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"truncated ({size} bytes; its header needs {8 + n + end})"
    return None


def temp_beside(path: Path) -> Path:
    """A name for a temporary file in `path`'s folder that no file has (`.NAME.tmp-PID[-N]`): never a name a user
    may own, such as `NAME.tmp`. Create it with mode "x"."""
    path = Path(path)
    tmp, n = path.with_name(f".{path.name}.tmp-{os.getpid()}"), 0
    while tmp.exists():
        n += 1
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{n}")
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it (`temp_beside`), fsync, rename: a kill leaves
    the old file or the new one."""
    path = Path(path)
    tmp = temp_beside(path)
    with tmp.open("x", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None when unknown."""
    import shutil

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float | None) -> str:
    """`512 B`, `3.0 MiB`, `1.2 GiB` (binary units); `unknown` for None."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_error(err: BaseException) -> bool:
    """Whether `err` says the storage refused a write (full, quota, read-only, permission)."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def disk_error(err: OSError, path: Path | None = None, needed: int | None = None) -> str:
    """One line: which path, why (the OS's words), the free space there and, when known, about how much is needed."""
    where = Path(err.filename) if getattr(err, "filename", None) else path
    reason = err.strerror or str(err)
    free = free_bytes(where) if where is not None else None
    parts = [f"{where}: {reason}" if where is not None else reason]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        parts.append(f"{human_bytes(free)} free" + (f", about {human_bytes(needed)} needed" if needed else ""))
    return "; ".join(parts)


def as_storage_error(err: BaseException, folder: Path) -> OSError | None:
    """The storage failure behind an exception raised while writing into `folder`, or None if it is not one.

    Writers do not all raise OSError: safetensors raises SafetensorError("... I/O error: No space left on device
    (os error 28)") and torch.save a RuntimeError("... file write failed"). Those are turned into the OSError they
    stand for, from the `os error N` in the message or, failing that, by probing the folder: a 1-byte write that
    fails, or less than 1 MiB free, is the storage's refusal."""
    import re

    if isinstance(err, OSError):
        return err
    match = re.search(r"os error (\d+)", str(err))
    if match:
        n = int(match.group(1))
        return OSError(n, os.strerror(n), str(folder))
    if not isinstance(err, (RuntimeError, ValueError)) and type(err).__name__ != "SafetensorError":
        return None
    probe = Path(folder) / ".write-probe"
    try:
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as refused:
        return OSError(refused.errno, refused.strerror, str(folder))
    free = free_bytes(folder)
    if free is not None and free < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return None


def _what(what: str) -> str:
    return f" ({what})" if what else ""
