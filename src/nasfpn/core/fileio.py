"""Files written atomically, with the permissions a new file gets under the umask.

Every file the package writes (weights, checkpoints, JSON, exported models, plots) goes through
``atomic_path``: it is written under a temporary name in its own folder and then ``os.replace``d
into place, so a reader, or a run killed mid-write, never sees half a file. ``mkstemp`` creates
files 0600; the finished file gets the mode any new file gets (0644 under the usual umask 022).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask_mode() -> int:
    """Permissions of a newly created file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write to; on leaving the block without an
    error it replaces ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(obj: Any, path: str | Path, indent: int | None = 1) -> Path:
    return write_text_atomic(json.dumps(obj, indent=indent) + "\n", path)


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
