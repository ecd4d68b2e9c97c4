"""The files of a text corpus and how their bytes become text.

A corpus is either "python_stdlib" (the running interpreter's own standard library: a real
code corpus of tens of MB present on every machine with Python, so a first run needs no
download) or a glob of text files. `tpullm.data.sources` reads them and counts what it finds.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

PYTHON_STDLIB = "python_stdlib"

# Folders of the stdlib that are not library code: installed packages (they differ between
# machines, so the corpus would too) and test suites (which also hold deliberately
# mis-encoded files, e.g. lib2to3/tests/data). idlelib/idle_test is matched by "idle_test".
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def python_stdlib_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted, without
    site-packages and test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of the excluded trees (site-packages can be huge).
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def corpus_files(corpus: str) -> list[tuple[str, Path]]:
    """(document name, path) of every file of `corpus`, in sorted (deterministic) order."""
    if corpus == PYTHON_STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = python_stdlib_files()
        if not files:
            raise FileNotFoundError(f"no .py files found in the Python standard library at {root}")
        return [(p.relative_to(root).as_posix(), p) for p in files]
    pattern = os.path.expanduser(corpus)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(
            f"data.corpus={corpus!r} matches no files; set it to {PYTHON_STDLIB!r} or to a glob of text "
            f"files such as 'data/**/*.txt' (use ** for subfolders, and check the working directory "
            f"{os.getcwd()} for relative globs)"
        )
    return [(p, Path(p)) for p in paths]


def decode_utf8(raw: bytes) -> tuple[str, bool]:
    """(text, broken): strict UTF-8, or, when that fails, U+FFFD for each bad byte and broken=True
    (so the caller counts it: a file is never dropped or silently altered)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True
