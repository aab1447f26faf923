"""Trajectory integrity: do a repo's checkpoint branches really hold distinct, complete weights?

Public trajectories are not always what their branch names say: some revisions lack weights, some
serve another revision's files (in pythia-2.8b, 76 step branches are bit-identical to ``main``), and
some mix shards from distant revisions (pythia-12b's step50000 serves the final model's first shard).
Averaging such a window silently averages the wrong checkpoints, so every Hub merge runs this check
first. It reads only tree listings (LFS sha256) and weight indexes, never weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hubmerge.errors import IntegrityError
from hubmerge.hub.client import HubClient, RevisionFiles, revision_files
from hubmerge.hub.revisions import Revision

Kind = Literal["no_weights", "incomplete", "duplicate", "shared_shards"]
Policy = Literal["refuse", "drop_duplicates", "skip"]


@dataclass(frozen=True)
class Finding:
    revision: str
    kind: Kind
    detail: str
    related: tuple[str, ...] = ()


@dataclass
class IntegrityReport:
    repo: str
    checked: list[RevisionFiles]
    findings: list[Finding] = field(default_factory=list)

    def for_revision(self, name: str) -> list[Finding]:
        return [f for f in self.findings if f.revision == name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revisions": [
                {
                    "revision": r.revision,
                    "commit": r.commit,
                    "format": r.weight_format,
                    "weights": [{"path": w, "size": r.files[w].size, "sha256": r.files[w].sha256} for w in r.weights],
                    "missing": r.missing,
                    "status": ",".join(sorted({f.kind for f in self.for_revision(r.revision)})) or "ok",
                }
                for r in self.checked
            ],
            "findings": [asdict(f) for f in self.findings],
        }


def analyse(revisions: Sequence[RevisionFiles], *, final: str | None = None) -> list[Finding]:
    """Find anomalies among revisions listed in training order (``main``, if given, last).

    ``final`` names the last step of the trajectory: that it equals ``main`` is expected, not an anomaly.
    When revisions are bit-identical, the one the weights belong to (the final model when ``main`` is
    among them, else the earliest) is left alone and the others are flagged as duplicates.
    """
    findings: list[Finding] = []
    for r in revisions:
        if r.weight_format is None:
            findings.append(Finding(r.revision, "no_weights", "no weight files (no safetensors or .bin weights)"))
        elif r.missing:
            findings.append(
                Finding(r.revision, "incomplete", f"{r.index_file} names {', '.join(r.missing)}, which is absent")
            )
    order = {r.revision: i for i, r in enumerate(revisions)}
    ids = {r.revision: {r.files[w].identity for w in r.weights} for r in revisions if r.weights}

    def owner(names: list[str]) -> str:
        if "main" in names:
            steps = [n for n in names if n != "main"]
            return final if final in names else (max(steps, key=order.__getitem__) if steps else "main")
        return min(names, key=order.__getitem__)

    groups: dict[frozenset[str], list[str]] = {}
    for name, s in ids.items():
        groups.setdefault(frozenset(s), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = owner(names)
        for n in names:
            if n not in (keep, "main"):
                others = tuple(m for m in names if m != n)
                findings.append(Finding(n, "duplicate", f"weights are bit-identical to {', '.join(others)}", others))
    # Partly shared weight files: the final model (main, or a revision identical to it) is taken to be
    # right; any other revision that serves some, but not all, of another's files is flagged.
    main_ids = ids.get("main")
    for a, sa in ids.items():
        if a == "main" or sa == main_ids:
            continue
        related = [b for b, sb in ids.items() if b != a and sa != sb and sa & sb]
        if related:
            shared = sorted({w for b in related for w in sa & ids[b]})
            findings.append(
                Finding(
                    a,
                    "shared_shards",
                    f"{len(shared)} of its {len(sa)} weight files are also served by {', '.join(related)}",
                    tuple(related),
                )
            )
    findings.sort(key=lambda f: (order[f.revision], f.kind))
    return findings


def check(
    repo: str,
    revisions: Sequence[Revision],
    client: HubClient,
    *,
    all_revisions: Sequence[Revision] | None = None,
    workers: int = 8,
) -> IntegrityReport:
    """List every selected revision's files (and ``main``'s, for comparison) and analyse them."""
    pool = list(revisions)
    everything = list(all_revisions or revisions)
    main = next((r for r in everything if r.name == "main"), None)
    if main is not None and main not in pool:
        pool.append(main)
    steps = [r for r in everything if r.step is not None and r.trajectory == (pool[0].trajectory if pool else "")]
    final = steps[-1].name if steps else None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        listed = list(ex.map(lambda r: revision_files(client, repo, r.name, r.commit), pool))
    findings = [f for f in analyse(listed, final=final) if f.revision in {r.name for r in revisions}]
    return IntegrityReport(repo, listed, findings)


def apply_policy(
    selected: Sequence[Revision], report: IntegrityReport, policy: Policy
) -> tuple[list[Revision], list[dict[str, str]]]:
    """Decide which revisions a merge keeps: refuse any anomaly, drop duplicates, or skip anomalous ones."""
    dropped: list[dict[str, str]] = []
    kept: list[Revision] = []
    for r in selected:
        found = report.for_revision(r.name)
        droppable = [f for f in found if policy == "skip" or (policy == "drop_duplicates" and f.kind == "duplicate")]
        if found and len(droppable) == len(found):
            dropped.append({"revision": r.name, "reason": "; ".join(f"{f.kind}: {f.detail}" for f in found)})
            continue
        kept.append(r)
    refused = [f for r in kept for f in report.for_revision(r.name)]
    if refused:
        lines = "; ".join(f"{f.revision}: {f.kind} ({f.detail})" for f in refused)
        hint = (
            "set sources.on_anomaly to drop_duplicates or skip to merge without them"
            if policy == "refuse"
            else "set sources.on_anomaly: skip to leave them out"
        )
        raise IntegrityError(f"{report.repo}: the selected window has anomalies: {lines}; {hint}", repo=report.repo)
    if not kept:
        raise IntegrityError(
            f"{report.repo}: every selected revision was dropped as anomalous; select others", repo=report.repo
        )
    return kept, dropped
