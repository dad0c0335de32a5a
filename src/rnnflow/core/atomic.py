"""Atomic file writes: a stage never leaves a half-written output behind."""

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rnnflow.core.errors import RnnflowError

# Errors of the output location itself (disk full, quota, read-only, no permission), which
# become one clear message; other OSErrors (e.g. a failed download) pass through unchanged.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR}
# Every file this process wrote (absolute paths, in order): a stage's timeline entry lists
# them, and a test checks them against the stage's declared DVC outputs.
WRITTEN: list[str] = []


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise RnnflowError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
        WRITTEN.append(os.path.abspath(path))
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if isinstance(err, OSError) and (
            err.errno in WRITE_ERRNOS or err.filename in (str(tmp_path), tmp_path)
        ):
            raise RnnflowError(f"cannot write {path}: {err.strerror or err}") from err
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, with sorted keys so equal content gives equal bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with an error that names the file if it is missing or invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RnnflowError(f"{path}: file not found (run the stage that makes it first)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RnnflowError(f"{path}: not valid JSON ({err})") from err
