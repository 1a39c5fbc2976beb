"""Outputs appear whole or not at all: everything is written into a temporary directory beside the
target, made durable, and renamed into place; an existing target is replaced only when asked, and only
after the new one is complete. An interrupted write leaves nothing that looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import QuantlabError


def check_output(output: str | Path, overwrite: bool, what: str = "", error: type[QuantlabError] = QuantlabError) -> Path:
    """``output`` as a Path, refused (``error``, one sentence) if it exists and ``overwrite`` is off.

    Called before long work starts, as well as when the result is installed.
    """
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise error(f"{what}{out} exists; pass --overwrite to replace it")
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is moved aside first and removed after."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    _fsync(out.parent)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink(missing_ok=True)


@contextmanager
def atomic_directory(output: str | Path, overwrite: bool, what: str = "",
                     error: type[QuantlabError] = QuantlabError) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``output``, on any error it vanishes.

    Files get the usual permissions under the umask (``mkdtemp`` makes a private directory) and are
    fsynced before the rename.
    """
    out = check_output(output, overwrite, what, error)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            _fsync(path)
        tmp.chmod(0o777 & ~umask)
        _fsync(tmp)
        check_output(out, overwrite, what, error)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
