"""Publishing to a Hub repo: a merged folder in one commit, or a trajectory as ``stepN`` branches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hubmerge.errors import HubmergeError, SourceError
from hubmerge.hub.client import HubClient
from hubmerge.io.progress import QUIET, Display
from hubmerge.io.provenance import PROVENANCE_FILE, try_read_provenance
from hubmerge.io.writer import TEMP_SUFFIX


@dataclass
class PushResult:
    repo: str
    branch: str | None
    commit_url: str
    pr_url: str | None
    commit: str


def default_message(folder: Path) -> str:
    """A commit message naming the recipe, the method and the sources, from ``hubmerge.json``."""
    prov = try_read_provenance(folder)
    if prov is None:
        return f"Upload {folder.name} with hubmerge"
    sources = prov.get("sources", [])
    revs = [s.get("revision") or Path(s.get("path", "")).name for s in sources]
    span = f"{revs[0]}..{revs[-1]}" if len(revs) > 1 else (revs[0] if revs else "")
    repo = next((s["repo"] for s in sources if s.get("repo")), None)
    origin = f" of {repo}" if repo else ""
    return f"hubmerge: {prov.get('name')} ({prov.get('method')} of {len(sources)} checkpoints{origin}, {span})"


def published_files(folder: Path) -> list[str]:
    """The folder's files a push uploads, as paths relative to it: all but hidden ones (``.cache/``, ``.git``) and
    a writer's partials."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")) and TEMP_SUFFIX not in rel:
            out.append(rel)
    return out


def push(
    folder: str | Path,
    repo: str,
    client: HubClient,
    *,
    branch: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    message: str | None = None,
    replace: Mapping[str, bytes] | None = None,
) -> PushResult:
    """Create the repo (and branch) if needed and upload the folder in a single commit.

    ``replace`` maps a file's path in the folder to the bytes published instead (the workflow's publishable
    ``hubmerge.json``: the folder's own copy keeps the local paths later commands need). Hidden files and folders
    and the writer's partials are never published.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    if not (folder / PROVENANCE_FILE).is_file() and not (folder / "config.json").is_file():
        raise SourceError(
            f"{folder}: not a model folder (no config.json or {PROVENANCE_FILE}); nothing pushed", path=folder
        )
    api = client.api
    with client.errors(repo, branch, "push to"):
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch and branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo,
            [CommitOperationAdd(rel, (replace or {}).get(rel, folder / rel)) for rel in published_files(folder)],
            commit_message=message or default_message(folder),
            revision=branch,
            create_pr=create_pr,
            repo_type="model",
        )
    return PushResult(repo, branch, info.commit_url, info.pr_url, info.oid)


def push_checkpoints(
    repo: str,
    checkpoints: Sequence[Path],
    client: HubClient,
    *,
    skip_existing: bool = False,
    display: Display = QUIET,
) -> int:
    """Publish a trajectory as Pythia does: each checkpoint folder as branch ``<folder name>``, the last also on main.

    Each branch gets exactly its folder (``delete_patterns="*"``). With ``skip_existing``, branches already on
    the Hub are kept as they are, so an interrupted push resumes. Returns how many branches were pushed.
    """
    if not checkpoints:
        raise HubmergeError(f"no checkpoints to push to {repo}", repo=repo)
    api = client.api
    with client.errors(repo, action="push to"):
        api.create_repo(repo, exist_ok=True)
        have = {b.name for b in api.list_repo_refs(repo).branches} if skip_existing else set()
    todo = [c for c in checkpoints if c.name not in have]
    with display.count("pushing branches", len(todo)) as bar:
        for ckpt in todo:
            with client.errors(repo, ckpt.name, "push to"):
                api.create_branch(repo, branch=ckpt.name, exist_ok=True)
                api.upload_folder(
                    repo_id=repo,
                    folder_path=ckpt,
                    revision=ckpt.name,
                    commit_message=f"checkpoint {ckpt.name}",
                    delete_patterns="*",
                )
            bar.advance(1)
    if todo:
        with client.errors(repo, "main", "push to"):
            api.upload_folder(repo_id=repo, folder_path=checkpoints[-1], commit_message="final checkpoint")
    return len(todo)
