"""Pretraining text: the Python standard library's top-level modules, which every Python install ships."""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The top-level ``*.py`` modules of the standard library, sorted by name so the corpus is stable."""
    root = root or stdlib_dir()
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: the standard library sources are needed "
                                "to pretrain the demo models")
    return files


def stdlib_corpus(root: Path | None = None) -> list[str]:
    """The text of every module from :func:`stdlib_files`, one string per file."""
    return [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files(root)]


def corpus_description() -> str:
    """Where the corpus came from, recorded next to the checkpoints (it depends on the Python version)."""
    return f"top-level *.py files of the Python {sys.version.split()[0]} standard library"
