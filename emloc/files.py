"""The file discipline of every stage: writes that a crash never leaves half done, reads and hashes.

A file is written under a temporary name and renamed onto its own (:func:`atomic_write`), a directory is
written fresh beside the old one and swapped in (:func:`atomic_directory`), so a reader or a resumed run sees
either the old output or the complete new one; a failed write raises :class:`~emloc.errors.OutputError`
naming the file. :func:`read_json` names the file it cannot read, and :func:`cached_file_sha256` hashes a
file's bytes once for as long as the file is untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputError, UserError
from .locking import output_lock

__all__ = ["atomic_directory", "atomic_write", "atomic_write_text", "cached_file_sha256", "file_sha256", "read_json"]


def _write_failed(path: Path, exc: Exception) -> OutputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OutputError(f"{path}: cannot write it ({reason})")


def atomic_write(path, write) -> Path:
    """Call ``write(temp_path)`` then rename the temporary file onto ``path``: a reader (or a resumed run)
    sees either the old file or the complete new one, never a partial write. A failed write (a full disk, a
    read-only file system) raises :class:`~emloc.errors.OutputError` naming ``path``."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with _failures_named(path):
            write(temp)
            os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _failures_named(path: Path):
    """A failed write (OS or safetensors error) becomes an :class:`~emloc.errors.OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, SafetensorError) as exc:
        raise _write_failed(path, exc) from exc


def atomic_write_text(path, text: str) -> Path:
    """:func:`atomic_write` of ``text``."""
    return atomic_write(path, lambda temp: Path(temp).write_text(text))


def atomic_directory(path, write, holds: str) -> Path:
    """Call ``write(temp_dir)`` on a fresh sibling directory, then swap it in for ``path``: nothing of an
    older output stays beside the new files (a stale shard would be loaded in their place), and until the
    swap the old directory is untouched. A killed swap leaves the temporary directories, which the next call
    removes.

    An existing ``path`` is replaced only if it is empty or holds the file ``holds`` (an earlier output of
    the same kind), so that a mistyped output path never deletes other files. The swap holds the lock of
    ``path`` (:func:`emloc.locking.output_lock`)."""
    path = Path(path)
    with output_lock(path):
        if path.is_dir() and any(path.iterdir()) and not (path / holds).is_file():
            raise UserError(f"{path}: exists, is not empty and holds no {holds}; it is not replaced, choose "
                            "another directory")
        temp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        try:
            with _failures_named(path):
                for leftover in (temp, old):
                    shutil.rmtree(leftover, ignore_errors=True)
                temp.mkdir(parents=True)
                write(temp)
                if path.exists():
                    os.replace(path, old)
                os.replace(temp, path)
        finally:
            for leftover in (temp, old):
                shutil.rmtree(leftover, ignore_errors=True)
    return path


def read_json(path):
    """The JSON document in ``path``; :class:`~emloc.errors.UserError` naming the file if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc})") from None


def file_sha256(path) -> str:
    """SHA-256 of the file at ``path``, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emloc" / "sha256.json"


def cached_file_sha256(path) -> str:
    """:func:`file_sha256`, remembered in ``$XDG_CACHE_HOME/emloc/sha256.json`` (``~/.cache``) under the
    file's absolute path, size, mtime and inode: a rewrite changes one of them, so a cached digest is reused
    only for an untouched file. A cache that cannot be read or written is ignored."""
    path = Path(path).absolute()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_path = _hash_cache()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = file_sha256(path)
    kept = {name: e for name, e in cache.items() if os.path.exists(name)}  # forget files that are gone
    with contextlib.suppress(OSError, UserError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps({**kept, str(path): {"stamp": stamp, "sha256": digest}}))
    return digest
