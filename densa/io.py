"""File helpers shared by every subpackage: atomic writes and input checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class InputError(ValueError):
    """Invalid user input: a missing, empty or unreadable file, or a bad value.

    The message names the value and the fix. The CLI turns it into exit code 2.
    """


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` on success.

    Readers never see a half-written file: if the body raises, the temporary
    file is removed and `path` keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file private (0600); outputs get the usual umask-based mode.
    os.chmod(tmp_path, 0o666 & ~current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, raising InputError for missing, empty or binary files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    if not path.is_file():
        raise InputError(f"not a regular file: {path}; pass a text file")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"file is empty: {path}; pass a file with text in it")
    if b"\x00" in data[:8192]:
        raise InputError(f"file looks binary (contains NUL bytes): {path}; pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"file is not valid UTF-8 at byte {err.start}: {path}; convert it to UTF-8 text"
        ) from None
