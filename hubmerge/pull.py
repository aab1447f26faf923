"""Pulling checkpoint revisions from a Hub into the standard Hugging Face cache.

Only what a merge needs is downloaded: each revision's weight files and index, and the config and
tokenizer once (from the newest revision). Files land in the same cache ``transformers`` and ``hf``
use (``HF_HOME`` / ``HF_HUB_CACHE`` respected), in parallel, resumably (the client resumes partial
downloads). Before any weight is fetched, tensor names and shapes of every revision are compared from
the remote safetensors headers; after, every LFS file's sha256 is checked against the Hub's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HubError, SourceError
from .hub import RevisionFiles, api, hub_errors, offline, revision_files, with_retries
from .plan import SourceRef
from .progress import Reporter, byte_progress
from .revisions import Revision, Selector, list_revisions, select


@dataclass
class PullPlan:
    repo: str
    revisions: list[Revision]
    files: list[RevisionFiles]

    def downloads(self) -> list[tuple[RevisionFiles, str]]:
        """(revision, path) pairs: weights and index of each revision, sidecars of the newest."""
        todo = []
        for i, rf in enumerate(self.files):
            names = list(rf.weights) + ([rf.index_file] if rf.index_file else [])
            if i == len(self.files) - 1:
                names += [s for s in rf.sidecars if s not in names]
            todo += [(rf, n) for n in names]
        return todo

    @property
    def total_bytes(self) -> int:
        return sum(rf.files[n].size for rf, n in self.downloads())


def all_revisions(repo: str, *, endpoint: str | None = None, token: str | None = None) -> list[Revision]:
    """Every branch in training order, from the Hub, or from the cache under ``HF_HUB_OFFLINE=1``."""
    return cached_revisions(repo) if offline() else list_revisions(repo, api=api(endpoint, token))


def resolve_selection(
    repo: str, selector: Selector, *, endpoint: str | None = None, token: str | None = None
) -> tuple[list[Revision], list[Revision]]:
    """(selected revisions in training order, every revision of the repo)."""
    everything = all_revisions(repo, endpoint=endpoint, token=token)
    return select(everything, selector, repo=repo), everything


def cached_revisions(repo: str, cache_dir: str | Path | None = None) -> list[Revision]:
    """Branches known to the local cache (``refs/``), for ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    from .revisions import parse_revision, sort_revisions

    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs"
    if not root.is_dir():
        raise HubError(f"{repo} is not in the local cache ({root.parent}) and HF_HUB_OFFLINE is set; pull it online")
    refs = [
        parse_revision(p.relative_to(root).as_posix(), p.read_text().strip())
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith("refs/")
    ]
    return sort_revisions(refs)


def plan_pull(
    repo: str, revisions: Sequence[Revision], *, endpoint: str | None = None, token: str | None = None, workers: int = 8
) -> PullPlan:
    client = api(endpoint, token)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        files = list(ex.map(lambda r: revision_files(client, repo, r.name, r.commit), revisions))
    for rf in files:
        if rf.weight_format is None:
            raise HubError(f"{repo}@{rf.revision} has no weight files; drop it from the selection")
        if rf.missing:
            raise HubError(f"{repo}@{rf.revision}: {rf.index_file} names {', '.join(rf.missing)}, which is absent")
    return PullPlan(repo, list(revisions), files)


def check_remote_headers(
    plan: PullPlan, *, endpoint: str | None = None, token: str | None = None, workers: int = 8
) -> int:
    """Compare tensor names and shapes of every safetensors revision from remote headers; return how many."""
    client = api(endpoint, token)
    st = [(r, rf) for r, rf in zip(plan.revisions, plan.files, strict=True) if rf.weight_format == "safetensors"]

    def shapes(item: tuple[Revision, RevisionFiles]) -> dict[str, tuple[str, tuple[int, ...]]]:
        r, rf = item
        with hub_errors(plan.repo, r.name, "read the safetensors headers of"):
            meta = with_retries(client.get_safetensors_metadata, plan.repo, revision=r.commit or r.name)
        return {n: (t.dtype, tuple(t.shape)) for fm in meta.files_metadata.values() for n, t in fm.tensors.items()}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        tables = list(ex.map(shapes, st))
    if not tables:
        return 0
    (ref_rev, _), ref = st[-1], tables[-1]
    for (r, _), table in zip(st, tables, strict=True):
        if table == ref:
            continue
        diff = sorted(set(table) ^ set(ref))
        if diff:
            has, lacks = (r.name, ref_rev.name) if diff[0] in table else (ref_rev.name, r.name)
            raise SourceError(
                f"{plan.repo}: tensor {diff[0]!r} is in revision {has} but not in {lacks}; nothing downloaded"
            )
        name = next(n for n in sorted(ref) if table[n][1] != ref[n][1] or table[n][0] != ref[n][0])
        raise SourceError(
            f"{plan.repo}: tensor {name!r} is {table[name][0]}{list(table[name][1])} in revision {r.name} but "
            f"{ref[name][0]}{list(ref[name][1])} in {ref_rev.name}; nothing downloaded"
        )
    return len(tables)


def _bridge(reporter: Reporter) -> type:
    """A tqdm class that forwards the client's byte counts to our rich bar (one bar for all files)."""
    from tqdm.auto import tqdm

    class _Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            reporter.advance(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            reporter.advance(n or 0)
            return None

    return _Bar


def _verified_cache() -> Path:
    root = Path(os.environ.get("HUBMERGE_CACHE") or Path.home() / ".cache" / "hubmerge")
    return root / "verified-blobs.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str, known: dict[str, str]) -> bool:
    """Whether the cached file's content has the sha256 the Hub lists; remembered per blob, size and mtime."""
    blob = path.resolve()
    st = blob.stat()
    key = f"{blob}:{st.st_size}:{st.st_mtime_ns}"
    if known.get(key) == expected:
        return True
    if _sha256(blob) != expected:
        return False
    known[key] = expected
    return True


def download(
    plan: PullPlan, *, endpoint: str | None = None, token: str | None = None, workers: int = 8, quiet: bool = False
) -> list[SourceRef]:
    """Download (or find in the cache) every needed file; return each revision's snapshot folder."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    client = api(endpoint, token)
    todo = plan.downloads()
    cache_file = _verified_cache()
    try:
        known: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    folders: dict[str, Path] = {}
    what = f"pulling {len(plan.revisions)} revision{'s' * (len(plan.revisions) != 1)} of {plan.repo}"
    with byte_progress(what, plan.total_bytes, quiet=quiet) as bar:
        bar_class = _bridge(bar)

        def fetch(item: tuple[RevisionFiles, str]) -> None:
            rf, name = item
            remote = rf.files[name]
            # A cached file streams nothing through the bar: count it when found, so the bar completes.
            cached = isinstance(try_to_load_from_cache(plan.repo, name, revision=rf.commit or rf.revision), str)
            for attempt in range(2):
                with hub_errors(plan.repo, rf.revision, "download"):
                    local = Path(
                        with_retries(
                            hf_hub_download,
                            plan.repo,
                            name,
                            revision=rf.commit or rf.revision,
                            endpoint=client.endpoint,
                            token=token,
                            tqdm_class=bar_class,
                            force_download=attempt > 0,
                        )
                    )
                if cached and attempt == 0:
                    bar.advance(remote.size)
                if remote.sha256 is None or _verify(local, remote.sha256, known):
                    break
                local.resolve().unlink(missing_ok=True)  # never keep or reuse a corrupt blob
                local.unlink(missing_ok=True)
                if attempt == 1:
                    raise HubError(
                        f"{plan.repo}@{rf.revision}: {name} does not match the sha256 the Hub lists for it, even after "
                        "downloading it again; the server or a proxy is serving corrupted data (nothing was kept)"
                    )
                bar.advance(-remote.size)
            folders[rf.revision] = local.parent if "/" not in name else local.parents[name.count("/")]

        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            list(ex.map(fetch, todo))
    for rf in plan.files:
        _record_ref(folders[rf.revision], rf.revision, rf.commit)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache_file)
    except OSError:
        pass  # the record only saves re-hashing next time
    return [
        SourceRef(folders[r.name], r.name, repo=plan.repo, revision=r.name, commit=rf.commit)
        for r, rf in zip(plan.revisions, plan.files, strict=True)
    ]


def _record_ref(snapshot: Path, branch: str, commit: str | None) -> None:
    """Write ``refs/<branch>`` as the client does when it resolves a branch, so ``HF_HUB_OFFLINE=1`` finds it.

    Files are fetched by commit sha (so a branch moving mid-pull cannot mix revisions), which the client
    does not record under the branch name.
    """
    if not commit or snapshot.parent.name != "snapshots":
        return
    ref = snapshot.parent.parent / "refs" / branch
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(ref.name + ".tmp")
    tmp.write_text(commit)
    tmp.replace(ref)


def pull_offline(repo: str, revisions: Sequence[Revision]) -> list[SourceRef]:
    """Find every revision's snapshot in the cache (``HF_HUB_OFFLINE=1``); fail naming what is missing."""
    from huggingface_hub import snapshot_download

    refs = []
    for r in revisions:
        with hub_errors(repo, r.name, "find in the cache"):
            folder = Path(snapshot_download(repo, revision=r.commit or r.name, local_files_only=True))
        refs.append(SourceRef(folder, r.name, repo=repo, revision=r.name, commit=r.commit or folder.name))
    return refs


def pull(
    repo: str,
    revisions: Sequence[Revision],
    *,
    endpoint: str | None = None,
    token: str | None = None,
    workers: int = 8,
    quiet: bool = False,
    console: Any = None,
) -> list[SourceRef]:
    """``hubmerge pull``: plan, check headers, download, verify; offline, resolve from the cache instead."""
    from .sizes import format_size

    if offline():
        return pull_offline(repo, revisions)
    plan = plan_pull(repo, revisions, endpoint=endpoint, token=token, workers=workers)
    checked = check_remote_headers(plan, endpoint=endpoint, token=token, workers=workers)
    if console is not None and not quiet:
        console.print(
            f"{repo}: {len(plan.revisions)} revisions, {len(plan.downloads())} files, {format_size(plan.total_bytes)} "
            f"(already cached files are not downloaded again); tensor names and shapes agree across {checked} "
            "revisions' safetensors headers"
        )
    return download(plan, endpoint=endpoint, token=token, workers=workers, quiet=quiet)


def cached_revision_files(folder: Path, revision: str, commit: str | None) -> RevisionFiles:
    """A cached snapshot described like a tree listing: LFS blobs in the cache are named by their sha256."""
    from .checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
    from .hub import RemoteFile

    files = {}
    for p in folder.iterdir():
        if p.is_file():
            blob = p.resolve().name
            sha = blob if len(blob) == 64 else None
            files[p.name] = RemoteFile(p.name, p.stat().st_size, sha, blob)
    info = RevisionFiles(revision, commit, files)
    for index, single, fmt in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        if index in files:
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            info.weight_format, info.index_file = fmt, index
            info.weights = [s for s in shards if s in files]
            info.missing = [s for s in shards if s not in files]
            break
        if single in files:
            info.weight_format, info.weights = fmt, [single]
            break
    return info


@dataclass
class HubResolution:
    """Hub sources made local: the folders to merge and what the integrity check decided."""

    sources: list[SourceRef]
    selected: list[Revision]
    kept: list[Revision]
    provenance: dict[str, Any]


def resolve_hub_sources(
    hub: Any,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    download: bool = True,
    quiet: bool = False,
    console: Any = None,
) -> HubResolution:
    """Select revisions, run the integrity check, apply the recipe's policy, then pull what is kept.

    With ``download=False`` (a dry run) nothing is downloaded and ``sources`` is empty.
    """
    from .integrity import IntegrityReport, analyse, apply_policy, check

    selected, everything = resolve_selection(hub.repo, hub.selector, endpoint=endpoint, token=token)
    if offline():
        refs = pull_offline(hub.repo, selected)
        listed = [cached_revision_files(r.path, r.revision or "", r.commit) for r in refs]
        report = IntegrityReport(hub.repo, listed, analyse(listed, final=selected[-1].name))
        mode = "offline (from the cache's content hashes)"
    else:
        report = check(hub.repo, selected, all_revisions=everything, endpoint=endpoint, token=token)
        mode = "online (tree listings with LFS sha256)"
    kept, dropped = apply_policy(selected, report, hub.on_anomaly)
    provenance = {
        "integrity": {
            "policy": hub.on_anomaly,
            "checked": mode,
            "selected": [r.name for r in selected],
            "dropped": dropped,
        }
    }
    if not download:
        return HubResolution([], selected, kept, provenance)
    if offline():
        by_name = {r.revision: r for r in refs}
        sources = [by_name[r.name] for r in kept]
    else:
        sources = pull(hub.repo, kept, endpoint=endpoint, token=token, quiet=quiet, console=console)
    return HubResolution(sources, selected, kept, provenance)
