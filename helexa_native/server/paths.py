"""Where /v1/models/load may open model files: anywhere, inside the --model-root directories, or nowhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..openai_protocol import ApiError


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long for the file system, say: nothing there to load
        return False


def resolve_model_path(path: str, roots: Optional[Sequence[Path]]) -> str:
    """The path /v1/models/load may open for `path`, given the server's model roots.

    roots None: any path the server can read (relative to its working
    directory). Otherwise the path must lie, after following symlinks and
    '..', inside one of `roots`; a relative path is looked up in each root in
    turn. An empty `roots` turns loading over HTTP off.
    """
    if roots is None:
        return path
    if not roots:
        raise ApiError(
            403,
            "this server does not load models over HTTP (start it with --model-root DIR to allow loading from DIR)",
            "permission_error",
            "model",
            "model_load_forbidden",
        )
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    p = Path(path).expanduser()
    candidates = [Path(os.path.realpath(c)) for c in ([p] if p.is_absolute() else [r / p for r in roots])]
    inside = [c for c in candidates if any(c == r or r in c.parents for r in real_roots)]
    if not inside:
        raise ApiError(
            403,
            f"'{path}' is outside the directories this server loads models from (--model-root)",
            "permission_error",
            "model",
            "model_load_forbidden",
        )
    found = next((c for c in inside if _exists(c)), None)
    if found is None:
        raise ApiError(
            400, f"model not found under the model roots: {path}", "invalid_request_error", "model", "model_load_failed"
        )
    return str(found)
