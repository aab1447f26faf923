"""``hubmerge.json``: what a merge read, how it weighted it and what it wrote, beside every merged folder.

One home for the file's name and format. It holds the recipe as the user wrote it (the mapping the merge
validated), each source (path, and repo/revision/commit for Hub sources), the weights, and every file's sha256;
no timestamps, no tokens, so the same merge writes the same bytes. Cards, pushes, sweeps (resuming) and the
results store (model keys) read it back through :func:`read_provenance`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hubmerge.errors import SourceError
from hubmerge.io.files import atomic_write

PROVENANCE_FILE = "hubmerge.json"


def dumps(data: dict[str, Any]) -> str:
    """The file's exact text: indented JSON with a final newline."""
    return json.dumps(data, indent=2) + "\n"


def write_provenance(folder: str | Path, data: dict[str, Any]) -> Path:
    """Write (or replace, atomically) ``folder/hubmerge.json``."""
    return atomic_write(Path(folder) / PROVENANCE_FILE, dumps(data))


def try_read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``hubmerge.json`` as a mapping, or None when it is absent or unreadable."""
    try:
        data = json.loads((Path(folder) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """The folder's ``hubmerge.json``; a folder without a readable one, listing sources, is not a hubmerge merge."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(
            f"{folder}: no {PROVENANCE_FILE}; this needs a folder written by `hubmerge merge` (merge first, or "
            "point at the merge's output folder)",
            path=path,
        ) from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a readable {PROVENANCE_FILE} ({e})", path=path) from e
    if not isinstance(prov, dict) or not isinstance(prov.get("sources"), list) or not prov["sources"]:
        raise SourceError(f"{path}: lists no sources; it was not written by `hubmerge merge`", path=path)
    return prov


def recorded_files(folder: str | Path) -> dict[str, str]:
    """``files`` of the folder's ``hubmerge.json`` (file name -> sha256), empty when there is none."""
    prov = try_read_provenance(folder) or {}
    files = prov.get("files")
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
