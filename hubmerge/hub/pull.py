"""Pulling checkpoint revisions from a Hub into the standard Hugging Face cache.

Only what a merge needs is downloaded: each revision's weight files and index, and the config and
tokenizer once (from the newest revision). Files land in the same cache ``transformers`` and ``hf``
use (``HF_HOME`` / ``HF_HUB_CACHE`` respected), in parallel, resumably (the client resumes partial
downloads). Before any weight is fetched, tensor names and shapes of every revision are compared from
the remote safetensors headers; after, every LFS file's sha256 is checked against the Hub's.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge.errors import HubError, SourceError
from hubmerge.hub.client import HubClient, RemoteFile, RevisionFiles, revision_files
from hubmerge.hub.integrity import IntegrityReport, analyse, apply_policy, check
from hubmerge.hub.revisions import Revision, Selector, resolve_selection
from hubmerge.io.checkpoint import SourceRef, read_weight_map
from hubmerge.io.files import atomic_write, sha256_file
from hubmerge.io.progress import QUIET, Display, Reporter
from hubmerge.io.sizes import format_size

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass
class PullPlan:
    repo: str
    revisions: list[Revision]
    files: list[RevisionFiles]
    all_sidecars: bool = False  # a sweep: every window's newest revision needs its config and tokenizer

    def downloads(self) -> list[tuple[RevisionFiles, str]]:
        """(revision, path) pairs: weights and index of each revision, sidecars of the newest (or of all)."""
        todo = []
        for i, rf in enumerate(self.files):
            names = list(rf.weights) + ([rf.index_file] if rf.index_file else [])
            if self.all_sidecars or i == len(self.files) - 1:
                names += [s for s in rf.sidecars if s not in names]
            todo += [(rf, n) for n in names]
        return todo

    @property
    def total_bytes(self) -> int:
        return sum(rf.files[n].size for rf, n in self.downloads())


def plan_pull(repo: str, revisions: Sequence[Revision], client: HubClient, *, workers: int = 8) -> PullPlan:
    """Every revision's weight files, from tree listings; a revision without (complete) weights is refused."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        files = list(ex.map(lambda r: revision_files(client, repo, r.name, r.commit), revisions))
    for rf in files:
        if rf.weight_format is None:
            raise HubError(
                f"{repo}@{rf.revision} has no weight files; drop it from the selection", repo=repo, revision=rf.revision
            )
        if rf.missing:
            raise HubError(
                f"{repo}@{rf.revision}: {rf.index_file} names {', '.join(rf.missing)}, which is absent",
                repo=repo,
                revision=rf.revision,
            )
    return PullPlan(repo, list(revisions), files)


def check_remote_headers(plan: PullPlan, client: HubClient, *, workers: int = 8) -> int:
    """Compare tensor names and shapes of every safetensors revision from remote headers; return how many."""
    st = [(r, rf) for r, rf in zip(plan.revisions, plan.files, strict=True) if rf.weight_format == "safetensors"]

    def shapes(item: tuple[Revision, RevisionFiles]) -> dict[str, tuple[str, tuple[int, ...]]]:
        r, _ = item
        with client.errors(plan.repo, r.name, "read the safetensors headers of"):
            meta = client.retry(client.api.get_safetensors_metadata, plan.repo, revision=r.commit or r.name)
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
                f"{plan.repo}: tensor {diff[0]!r} is in revision {has} but not in {lacks}; nothing downloaded",
                repo=plan.repo,
                revision=lacks,
                tensor=diff[0],
            )
        name = next(n for n in sorted(ref) if table[n][1] != ref[n][1] or table[n][0] != ref[n][0])
        raise SourceError(
            f"{plan.repo}: tensor {name!r} is {table[name][0]}{list(table[name][1])} in revision {r.name} but "
            f"{ref[name][0]}{list(ref[name][1])} in {ref_rev.name}; nothing downloaded",
            repo=plan.repo,
            revision=r.name,
            tensor=name,
        )
    return len(tables)


class FileShare:
    """One file's share of a pull's byte bar: what the client reports for it, capped at its size, and topped up to
    exactly its size once it is in place (a blob the cache already held under another revision streams nothing)."""

    def __init__(self, reporter: Reporter, size: int) -> None:
        self.reporter, self.size, self.counted = reporter, size, 0

    def advance(self, n: float = 1) -> None:
        n = max(-self.counted, min(int(n), self.size - self.counted))
        self.counted += n
        self.reporter.advance(n)

    def reset(self) -> None:
        self.advance(-self.counted)

    def finish(self) -> None:
        self.advance(self.size - self.counted)


def _bridge(reporter: Reporter | FileShare) -> type:
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


def _verify(path: Path, expected: str) -> bool:
    """Whether the cached file's content has the sha256 the Hub lists: every byte hashed, every time (a size
    and mtime are no evidence: a flipped byte with its mtime put back passed such a check)."""
    return sha256_file(path.resolve()) == expected


def download(
    plan: PullPlan, client: HubClient, *, workers: int = 8, display: Display = QUIET, verify: bool = True
) -> list[SourceRef]:
    """Download (or find in the cache) every needed file; return each revision's snapshot folder.

    ``verify``: hash every LFS file against the Hub's sha256 (re-downloading one that differs). A merge passes
    False: its reader hashes each file in the same read that merges it, and refuses a mismatch."""
    from huggingface_hub import try_to_load_from_cache

    from hubmerge.hub.partials import resume_partial

    todo = plan.downloads()
    folders: dict[str, Path] = {}
    what = f"pulling {len(plan.revisions)} revision{'s' * (len(plan.revisions) != 1)} of {plan.repo}"
    with display.bytes(what, plan.total_bytes) as bar:

        def fetch(item: tuple[RevisionFiles, str]) -> None:
            rf, name = item
            remote = rf.files[name]
            share = FileShare(bar, remote.size)
            bar_class = _bridge(share)
            revision = rf.commit or rf.revision
            # A cached file streams nothing through the bar: count it when found, so the bar completes.
            cached = isinstance(try_to_load_from_cache(plan.repo, name, revision=revision), str)
            if not cached and rf.commit and resume_partial(client, plan.repo, rf.revision, rf.commit, remote):
                cached = True  # a dead pull's leftover, completed by range requests: counted as found
            for attempt in range(2):
                local = client.download(
                    plan.repo, name, revision, label=rf.revision, tqdm_class=bar_class, force_download=attempt > 0
                )
                if cached and attempt == 0:
                    share.finish()
                if remote.sha256 is None or not verify or _verify(local, remote.sha256):
                    break
                local.resolve().unlink(missing_ok=True)  # never keep or reuse a corrupt blob
                local.unlink(missing_ok=True)
                if attempt == 1:
                    raise HubError(
                        f"{plan.repo}@{rf.revision}: {name} does not match the sha256 the Hub lists for it, even after "
                        "downloading it again; the server or a proxy is serving corrupted data (nothing was kept)",
                        repo=plan.repo,
                        revision=rf.revision,
                        path=name,
                    )
                share.reset()
            share.finish()
            folders[rf.revision] = local.parent if "/" not in name else local.parents[name.count("/")]

        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            list(ex.map(fetch, todo))
    for rf in plan.files:
        _record_ref(folders[rf.revision], rf.revision, rf.commit)
    return [
        SourceRef(
            folders[r.name],
            r.name,
            repo=plan.repo,
            revision=r.name,
            commit=rf.commit,
            sha256={w: str(rf.files[w].sha256) for w in rf.weights if rf.files[w].sha256},
        )
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
    atomic_write(ref, commit)


def pull_offline(repo: str, revisions: Sequence[Revision], client: HubClient) -> list[SourceRef]:
    """Find every revision's snapshot in the cache (``HF_HUB_OFFLINE=1``); fail naming what is missing."""
    from huggingface_hub import snapshot_download

    refs = []
    for r in revisions:
        with client.errors(repo, r.name, "find in the cache"):
            folder = Path(snapshot_download(repo, revision=r.commit or r.name, local_files_only=True))
        listed = cached_revision_files(folder, r.name, r.commit or folder.name)
        sha = {w: str(listed.files[w].sha256) for w in listed.weights if listed.files[w].sha256}
        refs.append(SourceRef(folder, r.name, repo=repo, revision=r.name, commit=r.commit or folder.name, sha256=sha))
    return refs


def pull(
    repo: str,
    revisions: Sequence[Revision],
    client: HubClient,
    *,
    workers: int = 8,
    display: Display = QUIET,
    all_sidecars: bool = False,
    verify: bool = True,
) -> list[SourceRef]:
    """``hubmerge pull``: plan, check headers, download, verify; offline, resolve from the cache instead.

    ``all_sidecars``: config and tokenizer of every revision, not only of the newest (a sweep's windows).
    ``verify=False``: leave the sha256 check to the caller's reader (a merge hashes as it reads)."""
    if client.offline:
        return pull_offline(repo, revisions, client)
    plan = plan_pull(repo, revisions, client, workers=workers)
    plan.all_sidecars = all_sidecars
    checked = check_remote_headers(plan, client, workers=workers)
    display.note(
        f"{repo}: {len(plan.revisions)} revisions, {len(plan.downloads())} files, {format_size(plan.total_bytes)} "
        f"(already cached files are not downloaded again); tensor names and shapes agree across {checked} "
        "revisions' safetensors headers"
    )
    return download(plan, client, workers=workers, display=display, verify=verify)


def cached_revision_files(folder: Path, revision: str, commit: str | None) -> RevisionFiles:
    """A cached snapshot described like a tree listing: LFS blobs in the cache are named by their sha256."""
    files = {}
    for p in folder.iterdir():
        if p.is_file():
            blob = p.resolve().name
            sha = blob if len(blob) == 64 else None
            files[p.name] = RemoteFile(p.name, p.stat().st_size, sha, blob)
    return RevisionFiles.from_files(revision, commit, files, lambda index: read_weight_map(folder / index))


@dataclass
class HubResolution:
    """Hub sources made local: the folders to merge and what the integrity check decided."""

    sources: list[SourceRef]
    selected: list[Revision]
    kept: list[Revision]
    provenance: dict[str, Any]


def resolve_hub_sources(
    repo: str,
    selector: Selector,
    on_anomaly: str,
    client: HubClient,
    *,
    download: bool = True,
    display: Display = QUIET,
    all_sidecars: bool = False,
) -> HubResolution:
    """Select revisions, run the integrity check, apply the ``on_anomaly`` policy, then pull what is kept.

    With ``download=False`` (a dry run) nothing is downloaded and ``sources`` is empty.
    """
    selected, everything = resolve_selection(repo, selector, client)
    if client.offline:
        refs = pull_offline(repo, selected, client)
        listed = [cached_revision_files(r.path, r.revision or "", r.commit) for r in refs]
        report = IntegrityReport(repo, listed, analyse(listed, final=selected[-1].name))
        mode = "offline (from the cache's content hashes)"
    else:
        report = check(repo, selected, client, all_revisions=everything)
        mode = "online (tree listings with LFS sha256)"
    kept, dropped = apply_policy(selected, report, on_anomaly)  # type: ignore[arg-type]
    provenance = {
        # where the sources came from (a card's commands need it when that is not huggingface.co)
        "endpoint": (client.endpoint or DEFAULT_ENDPOINT).rstrip("/"),
        "integrity": {
            "policy": on_anomaly,
            "checked": mode,
            "selected": [r.name for r in selected],
            "dropped": dropped,
        },
    }
    resolution = HubResolution([], selected, kept, provenance)
    if download:
        resolution.sources = fetch_kept(repo, resolution, client, display=display, all_sidecars=all_sidecars)
    return resolution


def fetch_kept(
    repo: str,
    resolution: HubResolution,
    client: HubClient,
    *,
    display: Display = QUIET,
    all_sidecars: bool = False,
    verify: bool = True,
) -> list[SourceRef]:
    """The local folders of the revisions a resolution kept: pulled, or found in the cache when offline."""
    if client.offline:
        by_name = {r.revision: r for r in pull_offline(repo, resolution.kept, client)}
        return [by_name[r.name] for r in resolution.kept]
    return pull(repo, resolution.kept, client, display=display, all_sidecars=all_sidecars, verify=verify)
