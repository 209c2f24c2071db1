"""Copy a slow (network-mounted) dataset folder to local disk once, and reuse the copy while it is unchanged.

The seed's NAS advice: reading many small files over the network makes loads I/O-bound; a local copy turns them
back into cheap reads. The copy lives at <cache_root>/<folder name>-<key>, where the key hashes the source's
absolute path and every file's relative path, size and mtime, so an edited, added or removed file means a new
copy (and the stale one is removed). The copy is written to a temporary folder and renamed into place, so a copy
that is cut short is never used; a file lock makes the local ranks of one machine copy once, not once each.
Checking for changes stats every file of the source (cheap next to reading them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from tandem import envs

__all__ = ["cache_dataset_folder", "default_cache_root"]

logger = logging.getLogger(__name__)

_SOURCE = ".source.json"   # sidecar next to each copy: which folder it came from


def default_cache_root() -> Path:
    """Where dataset copies go by default: <TANDEM_CACHE_DIR or ~/.cache/tandem>/datasets."""
    return Path(envs.cache_dir()) / "datasets"


def _manifest(src: Path) -> tuple[list[tuple[str, int, int]], int]:
    """(relative path, size, mtime_ns) of every file under src, sorted; and the total bytes."""
    files: list[tuple[str, int, int]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.stat()
            files.append((path.relative_to(src).as_posix(), st.st_size, st.st_mtime_ns))
            total += st.st_size
    return files, total


def _key(src: Path, files: list[tuple[str, int, int]]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(src).encode())
    digest.update(json.dumps(files).encode())
    return digest.hexdigest()


def _remove_stale(root: Path, src: Path, keep: Path) -> None:
    for side in root.glob(f"{src.name}-*{_SOURCE}"):
        copy = side.with_name(side.name[: -len(_SOURCE)])
        try:
            same_source = json.loads(side.read_text()).get("source") == str(src)
        except (OSError, ValueError):
            continue
        if same_source and copy != keep:
            logger.info("removing the stale dataset copy %s (its source %s changed)", copy, src)
            shutil.rmtree(copy, ignore_errors=True)
            side.unlink(missing_ok=True)


def cache_dataset_folder(src: str | Path, cache_root: str | Path | None = None) -> Path:
    """The local copy of folder `src` (copied now if there is none for its current contents)."""
    source = Path(src).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"dataset folder {source} does not exist (or is not a folder)")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    files, total = _manifest(source)
    dst = root / f"{source.name}-{_key(source, files)}"
    with open(root / f".{source.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another local rank may be copying the same folder right now
        if dst.is_dir():
            logger.debug("reusing the dataset copy %s of %s", dst, source)
            return dst
        start = time.perf_counter()
        tmp = root / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, tmp, copy_function=shutil.copy2)
            Path(f"{dst}{_SOURCE}").write_text(json.dumps({"source": str(source), "files": len(files),
                                                             "bytes": total}))
            os.rename(tmp, dst)   # atomic: dst exists only complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale(root, source, dst)
    logger.info("copied dataset %s to %s: %d files, %.1f MB in %.1f s", source, dst, len(files), total / 1e6,
                time.perf_counter() - start)
    return dst
