"""Download a file once, verify its sha256, and cache it; never leave a partial file behind."""

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rnnflow.core.atomic import atomic_path
from rnnflow.core.errors import RnnflowError

CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file at a canonical URL with its pinned sha256."""

    url: str
    sha256: str
    name: str


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: RemoteFile, cache_dir: Path, timeout: float = 60.0) -> Path:
    """Return the cached, verified file, downloading it first if needed."""
    target = cache_dir / remote.name
    if target.exists():
        if sha256_of(target) == remote.sha256:
            return target
        target.unlink()  # a stale or tampered cache entry is replaced, never trusted
    try:
        with atomic_path(target) as tmp, urllib.request.urlopen(remote.url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with (
                open(tmp, "wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=remote.name, disable=None) as bar,
            ):
                while chunk := r.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != remote.sha256:
                raise RnnflowError(
                    f"{remote.url}: sha256 mismatch (expected {remote.sha256}, "
                    f"got {digest.hexdigest()}); the download was discarded"
                )
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise RnnflowError(f"{remote.url}: download failed ({reason})") from err
    return target
