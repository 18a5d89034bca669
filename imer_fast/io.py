"""Atomic file writes: a crash or a full disk mid-write never leaves a truncated file behind, and
never destroys the previous version (write to a temporary file in the same folder, then rename)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the file's old one)
        os.fchmod(fd, _target_mode(path))
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Strict JSON: NaN and infinities (a metric with nothing to measure) are written as null, which every
    parser reads; ``json.dump``'s bare ``NaN`` tokens are not JSON."""
    return atomic_write(path, lambda f: json.dump(_finite_or_none(obj), f, indent=2, sort_keys=True,
                                                  allow_nan=False))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def atomic_torch_save(path: PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_torch_file(path: PathLike, map_location, what: str):
    """``torch.load`` of a file this library wrote; anything unreadable (empty, truncated, another format)
    is a ValueError naming ``what`` and the file. A missing file stays a FileNotFoundError, a folder says so."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling and zip errors have many types
        raise ValueError(f"{what}: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
