"""Output paths checked before any work: every file a command will write (model, report, JSON) must be creatable,
so that a missing or read-only directory fails in a second with one line instead of after the whole calibration
and compression (and never leaves a half-written set of outputs behind)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import UsageError


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``: the only reliable test (os.access says yes to root on a
    read-only mount, and no to nothing on many network file systems)."""
    fd, name = tempfile.mkstemp(prefix=".onnxobc-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def check_writable_outputs(paths: Mapping[str, str | os.PathLike | None] | Iterable[str | os.PathLike | None],
                           force: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """UsageError (one line) unless every path in ``paths`` ({option: path} or paths; None entries are ignored)
    can be written: its directory exists, is a directory and accepts new files; the path is not a directory;
    it does not exist yet unless ``force``; it is none of ``inputs`` (never overwritten, even with ``force``);
    no two options name the same file."""
    items = list(paths.items()) if isinstance(paths, Mapping) else [("output", p) for p in paths]
    seen: dict[Path, str] = {Path(i).resolve(): "input" for i in inputs if isinstance(i, (str, os.PathLike))}
    probed: set[Path] = set()
    for label, p in items:
        if p is None or p == "":
            continue
        path = Path(p)
        key = path.resolve()
        if key in seen:
            what = "an input file (inputs are never modified)" if seen[key] == "input" else f"the {seen[key]} path"
            raise UsageError(f"{label} {path} is {what}: give each output its own file")
        seen[key] = label
        if path.is_dir():
            raise UsageError(f"{label} {path} is a directory: give a file path such as {path / 'out'}")
        if path.exists() and not force:
            raise UsageError(f"{label} {path} already exists: choose another path or pass --force to overwrite it")
        parent = path.parent
        if not parent.exists():
            existing = next((q for q in parent.parents if q.exists()), None)
            if existing is not None and not existing.is_dir():
                raise UsageError(f"{label} {path}: {existing} is a file, not a directory")
            raise UsageError(f"{label} {path}: directory {parent} does not exist: create it first")
        if not parent.is_dir():
            raise UsageError(f"{label} {path}: {parent} is a file, not a directory")
        if parent.resolve() in probed:
            continue
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{label} {path}: directory {parent} is not writable: choose another directory")
        try:
            _probe(parent)
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise UsageError(f"{label} {path}: cannot create files in directory {parent} ({why}): "
                             f"choose another directory") from e
        probed.add(parent.resolve())
