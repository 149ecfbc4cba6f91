"""The run directory's files, written whole or not at all, and read back naming what a crash left.

Every file a run writes (``summary.json``, ``config.yaml``, ``ranks.json``, ``privacy.json``,
``state/server.pt``, generated samples) goes through :func:`write_bytes`: a temporary file beside
it, flushed to the disk, then renamed over it. A write that fails (a full disk, a read-only
directory) leaves the previous file, or none: never an empty or a half-written one.
``metrics.jsonl`` grows by :func:`append_line`, which cuts a row it could not write whole back off
the file; a row a crash leaves half-written anyway (a killed process, a lost power) is the file's
last line, and :func:`metrics_rows` drops it with a warning. The server state keeps the previous
round's beside it (:func:`previous`), to resume from when the last is damaged (:func:`load_torch`).

Errors are ``OSError`` with the file's name (:func:`os_error` also reads the ``os error N`` of
safetensors' and torch's own I/O errors), for the server to say in one line what it could not write.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError

log = logging.getLogger("fedpeft")


def previous(path: Path) -> Path:
    """Where :func:`save_torch` keeps the file ``path`` held before its last write (``server.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")



def _named(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (the file meant, not its temporary sibling)."""
    return OSError(e.errno, e.strerror or os.strerror(e.errno or 0), str(path))


def os_error(e: BaseException, path: Path | None = None) -> OSError | None:
    """The ``OSError`` behind ``e``: ``e`` itself, one in its causes, or the ``(os error N)`` that
    safetensors' errors (Rust's ``io::Error``) carry in their text; None when it is no I/O error."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen if path is None or seen.filename else _named(seen, path)
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path) if path is not None else None)
    return None


def write_bytes(path: Path, data: bytes, *, keep_previous: bool = False) -> None:
    """``data`` at ``path``, whole or not at all: a temporary sibling written and flushed to the
    disk, then renamed over ``path``. ``keep_previous``: the file ``path`` held stays as
    :func:`previous` (a hard link, or a copy where links are not supported)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            old = previous(path)
            old_tmp = old.with_name(old.name + ".tmp")
            old_tmp.unlink(missing_ok=True)
            try:
                os.link(path, old_tmp)
            except OSError:
                shutil.copyfile(path, old_tmp)
            os.replace(old_tmp, old)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from None


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """One line (a metrics row) at the end of ``path``, flushed to the disk; a line that could not
    be written whole is cut off again, so the file ends with its last complete line."""
    path = Path(path)
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write((line.rstrip("\n") + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            try:
                f.truncate(size)
            except OSError:
                pass
            raise _named(e, path) from None


def save_torch(obj: Any, path: Path, *, keep_previous: bool = False) -> None:
    """``torch.save`` of ``obj`` at ``path``, through :func:`write_bytes` (torch's own writer
    reports a full disk as ``unexpected pos …``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue(), keep_previous=keep_previous)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_torch(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dict ``torch.load`` reads from ``path``, which must hold ``keys``; a damaged file is a
    :class:`ValueError` saying what is wrong with it (one line)."""
    import torch

    try:
        obj = torch.load(path, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise ValueError(f"{path} is damaged (a truncated or corrupted file: {first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is damaged (it holds a {type(obj).__name__}, not a fedpeft server state)")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path} is damaged (it lacks {', '.join(map(repr, missing))} of a fedpeft server state)")
    return obj


def metrics_rows(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none: no such file). A last line that is not a
    complete row (what a crash or a full disk leaves mid-write) is dropped with a warning, and with
    ``repair`` cut off the file; any other line that is not a row is a :class:`ConfigError` naming
    the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise ValueError("not a metrics row (an object with an integer 'round')")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k == len(numbered) - 1:
                log.warning("%s: line %d is a half-written row (%s), what an interrupted write leaves; dropped", path, number, first_line(e))
                if repair:
                    write_bytes(path, b"".join(line + b"\n" for _, line in numbered[:-1]))
                break
            raise ConfigError(f"{path} line {number} is not a metrics row ({first_line(e)}); "
                              f"restore the file from a copy or delete that line") from None
        rows.append(row)
    return rows


def no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
