"""Publishing a merged folder to a Hub repo, in one commit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HubmergeError
from .hub import api, hub_errors
from .writer import TEMP_SUFFIX


@dataclass
class PushResult:
    repo: str
    branch: str | None
    commit_url: str
    pr_url: str | None
    commit: str


def default_message(folder: Path) -> str:
    """A commit message naming the recipe, the method and the sources, from ``hubmerge.json``."""
    try:
        prov = json.loads((folder / "hubmerge.json").read_text())
    except (OSError, ValueError):
        return f"Upload {folder.name} with hubmerge"
    sources = prov.get("sources", [])
    revs = [s.get("revision") or Path(s.get("path", "")).name for s in sources]
    span = f"{revs[0]}..{revs[-1]}" if len(revs) > 1 else (revs[0] if revs else "")
    repo = next((s["repo"] for s in sources if s.get("repo")), None)
    origin = f" of {repo}" if repo else ""
    return f"hubmerge: {prov.get('name')} ({prov.get('method')} of {len(sources)} checkpoints{origin}, {span})"


def push(
    folder: str | Path,
    repo: str,
    *,
    branch: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Create the repo (and branch) if needed and upload the folder in a single commit."""
    folder = Path(folder)
    if not (folder / "hubmerge.json").is_file() and not (folder / "config.json").is_file():
        raise HubmergeError(f"{folder}: not a model folder (no config.json or hubmerge.json); nothing pushed")
    client = api(endpoint, token)
    with hub_errors(repo, branch, "push to"):
        client.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch and branch != "main":
            client.create_branch(repo, branch=branch, exist_ok=True, repo_type="model")
        info = client.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=branch,
            commit_message=message or default_message(folder),
            create_pr=create_pr,
            ignore_patterns=[f"*{TEMP_SUFFIX}*", ".*"],
        )
    return PushResult(repo, branch, info.commit_url, info.pr_url, info.oid)


def push_checkpoints(
    client: Any,
    repo: str,
    checkpoints: list[Path],
    *,
    skip_existing: bool = False,
    quiet: bool = False,
    console: Any = None,
) -> int:
    """Publish a trajectory as Pythia does: each checkpoint folder as branch ``<folder name>``, the last also on main.

    Each branch gets exactly its folder (``delete_patterns="*"``). With ``skip_existing``, branches already on
    the Hub are kept as they are, so an interrupted push resumes. Returns how many branches were pushed.
    """
    from .progress import count_progress

    client.create_repo(repo, exist_ok=True)
    have = {b.name for b in client.list_repo_refs(repo).branches} if skip_existing else set()
    todo = [c for c in checkpoints if c.name not in have]
    with count_progress("pushing branches", len(todo), quiet=quiet, console=console) as bar:
        for ckpt in todo:
            client.create_branch(repo, branch=ckpt.name, exist_ok=True)
            client.upload_folder(
                repo_id=repo,
                folder_path=ckpt,
                revision=ckpt.name,
                commit_message=f"checkpoint {ckpt.name}",
                delete_patterns="*",
            )
            bar.advance(1)
    if todo:
        client.upload_folder(repo_id=repo, folder_path=checkpoints[-1], commit_message="final checkpoint")
    return len(todo)
