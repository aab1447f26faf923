"""A merge plan: what will be read, computed and written, decided before any byte is written.

``hubmerge merge --dry-run`` prints this plan; :func:`hubmerge.merging.executor.execute` carries it out.
Every check that can fail on the inputs (missing folders, differing tensor names, shapes or buffers) runs
here, so a bad input never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubmerge.errors import OutputError, SourceError
from hubmerge.io.checkpoint import (
    DTYPE_NAMES,
    FLOATING,
    ITEMSIZE,
    SIDECAR_FILES,
    Checkpoint,
    SourceRef,
    is_output_head,
    open_checkpoint,
)
from hubmerge.io.files import check_free_space, free_space
from hubmerge.merging.methods import source_weights
from hubmerge.merging.recipe import RecipeDocument
from hubmerge.version import __version__

# Elements per read unit and per cache-sized arithmetic block; see executor.py for why.
CHUNK_ELEMS = 4 * 1024 * 1024
BLOCK_ELEMS = 1024 * 1024
READ_BUFFERS = 4
WRITE_BUFFERS = 2
# Resident size of a Python process that has imported torch, measured on Linux (x86_64, torch 2.13 CPU).
PROCESS_BASELINE_BYTES = 230 * 10**6


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    floating: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.out_dtype]


@dataclass
class ShardPlan:
    file: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)


@dataclass
class StreamPlan:
    """A streamed merge's reading: the tensor order, the reader, and what it costs the network and memory."""

    order: list[TensorPlan]  # the plan's tensors in the sources' byte order
    open_reader: Callable[..., Any]  # the executor's ReaderFactory
    bytes: int  # every byte of every source file (each is read whole, to verify its sha256)
    files: int
    connections: int
    in_flight_bytes: int
    # source index -> its snapshot folder on this machine, config and tokenizer fetched if missing (a Ray worker)
    snapshot: Callable[[int], Path] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "files": self.files,
            "connections": self.connections,
            "in_flight_bytes": self.in_flight_bytes,
        }


@dataclass
class MergePlan:
    name: str
    method: str
    sources: list[SourceRef]
    checkpoints: list[Checkpoint]
    weights: list[float]
    shards: list[ShardPlan]
    output: Path
    sidecar_files: list[str]
    dropped_aliases: dict[str, str]
    recipe: dict[str, Any]
    recipe_file: str | None
    out_dtype: str | None
    device: str = "cpu"
    extra_provenance: dict[str, Any] = field(default_factory=dict)
    stream: StreamPlan | None = None  # fetch: stream: how the sources are read from the Hub
    nonfinite: str = "refuse"  # a NaN/Inf in a source, or an overflowing cast: refuse (exit 3) | warn
    disk_free: int | None = None  # bytes free where the output goes, once check_disk_space has looked

    @property
    def disk_bytes(self) -> int:
        """Bytes the output takes on disk while it is built (its partial folder) and after: shards and copies."""
        newest = self.checkpoints[-1].path
        return self.bytes_written + sum((newest / f).stat().st_size for f in self.sidecar_files)

    @property
    def fetch(self) -> str:
        return "stream" if self.stream is not None else "cache"

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def bytes_read(self) -> int:
        names = {t.name for t in self.tensors}
        return sum(ck.tensors[n].nbytes for ck in self.checkpoints for n in names)

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def chunk_elems(self) -> int:
        """Elements per streamed chunk: ``CHUNK_ELEMS``, or less when every tensor is smaller."""
        return max(1, min(CHUNK_ELEMS, max(t.numel for t in self.tensors)))

    @property
    def buffer_bytes(self) -> int:
        """Peak bytes of merge buffers: bounded by the chunk size, not by the model or the source count."""
        in_item = max(ITEMSIZE[t.dtype] for ck in self.checkpoints for t in ck.tensors.values())
        out_item = max(ITEMSIZE[t.out_dtype] for t in self.tensors)
        chunk = self.chunk_elems
        return chunk * (READ_BUFFERS * in_item + 4 + WRITE_BUFFERS * out_item) + min(chunk, BLOCK_ELEMS) * 4

    @property
    def memory_estimate(self) -> int:
        in_flight = self.stream.in_flight_bytes if self.stream else 0
        return PROCESS_BASELINE_BYTES + self.buffer_bytes + in_flight

    def to_dict(self) -> dict[str, Any]:
        tensors = self.tensors
        return {
            "name": self.name,
            "method": self.method,
            "sources": [
                {**s.to_dict(), "format": ck.format, "files": ck.files, "bytes": ck.nbytes, "weight": w}
                for s, ck, w in zip(self.sources, self.checkpoints, self.weights, strict=True)
            ],
            "tensors": len(tensors),
            "averaged_tensors": sum(t.floating for t in tensors),
            "copied_tensors": sum(not t.floating for t in tensors),
            "dropped_aliases": self.dropped_aliases,
            "dtype": self.out_dtype,
            "output": str(self.output),
            "shards": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.nbytes} for s in self.shards],
            "copied_files": self.sidecar_files,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "memory_estimate_bytes": self.memory_estimate,
            "disk_bytes": self.disk_bytes,
            "disk_free_bytes": self.disk_free,
            "device": self.device,
            "fetch": self.fetch,
            **({"stream": self.stream.to_dict()} if self.stream else {}),
        }


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_compatible(sources: Sequence[SourceRef], cks: Sequence[Checkpoint]) -> None:
    """Refuse sources that differ in tensor names, shapes, or kinds, naming the first difference."""
    ref, ref_src = cks[-1], sources[-1]
    ref_names = set(ref.tensors)
    for src, ck in zip(sources, cks, strict=True):
        if src is ref_src:
            continue
        names = set(ck.tensors)
        if names != ref_names:
            diff = sorted(names ^ ref_names, key=_natural_key)[0]
            has, lacks = (src, ref_src) if diff in names else (ref_src, src)
            raise SourceError(
                f"tensor {diff!r} is in {has.describe()} but not in {lacks.describe()}; "
                "all sources must be checkpoints of the same architecture",
                path=lacks.path,
                tensor=diff,
            )
        for name in sorted(ref_names, key=_natural_key):
            a, b = ref.tensors[name], ck.tensors[name]
            if a.shape != b.shape:
                raise SourceError(
                    f"tensor {name!r} has shape {list(b.shape)} in {src.describe()} but {list(a.shape)} "
                    f"in {ref_src.describe()}; all sources must have the same architecture",
                    path=src.path,
                    tensor=name,
                )
            if (a.dtype in FLOATING) != (b.dtype in FLOATING) or (a.dtype not in FLOATING and a.dtype != b.dtype):
                raise SourceError(
                    f"tensor {name!r} is {b.dtype} in {src.describe()} but {a.dtype} in {ref_src.describe()}; "
                    "non-floating buffers must match exactly",
                    path=src.path,
                    tensor=name,
                )


def _tie_word_embeddings(path: Path) -> bool:
    try:
        return bool(json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False))
    except (OSError, ValueError, AttributeError):
        return False


def build_plan(
    doc: RecipeDocument,
    sources: list[SourceRef] | None = None,
    *,
    device: str = "cpu",
    force: bool = False,
    weights: Sequence[float] | None = None,
    checkpoints: list[Checkpoint] | None = None,
) -> MergePlan:
    """Inspect every source's headers and decide the output; reads no tensor data.

    ``sources`` are resolved folders (Hub sources arrive here already downloaded); by default the
    recipe's local paths. ``weights`` replaces the recipe's (a Hub recipe's weights of the revisions kept
    after the integrity check). ``checkpoints``, when given, are those sources already opened (a sweep plans
    many windows over the same checkpoints and opens each once).
    """
    recipe = doc.recipe
    if sources is None:
        sources = [SourceRef(p, p.name) for p in doc.local_sources()]
    cks = checkpoints if checkpoints is not None else [open_checkpoint(s.path) for s in sources]
    check_compatible(sources, cks)
    weights = source_weights(recipe.method, len(sources), weights or recipe.weights, recipe.decay)
    out_dtype = DTYPE_NAMES[recipe.dtype] if recipe.dtype else None
    newest = cks[-1]
    tie = _tie_word_embeddings(newest.path)
    dropped = {}
    planned = []
    for name in sorted(newest.tensors, key=_natural_key):
        info = newest.tensors[name]
        if info.alias_of is not None and tie and is_output_head(name):
            dropped[name] = info.alias_of  # transformers re-ties it on load, as in the sources
            continue
        floating = info.dtype in FLOATING
        planned.append(TensorPlan(name, info.shape, (out_dtype or info.dtype) if floating else info.dtype, floating))

    max_shard = recipe.output.max_shard_bytes
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in planned:
        if groups[-1] and size + t.out_nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.out_nbytes
    if len(groups) == 1:
        shards = [ShardPlan("model.safetensors", groups[0])]
    else:
        n = len(groups)
        shards = [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    output = Path(recipe.output.path).expanduser().resolve()
    if output.exists() and not force:
        raise OutputError(
            f"{output} already exists; pass --force to replace it, or choose another output.path", path=output
        )
    sidecars = [f for f in SIDECAR_FILES if (newest.path / f).is_file()]
    return MergePlan(
        name=recipe.name,
        method=recipe.method,
        sources=sources,
        checkpoints=cks,
        weights=weights,
        shards=shards,
        output=output,
        sidecar_files=sidecars,
        dropped_aliases=dropped,
        recipe=doc.raw,
        recipe_file=doc.file,
        out_dtype=recipe.dtype,
        device=device,
        nonfinite=recipe.nonfinite,
    )


def check_disk_space(plan: MergePlan) -> MergePlan:
    """Refuse up front (exit 4) a merge whose output would not fit where it goes; record the free space seen."""
    folder, plan.disk_free = free_space(plan.output.parent)
    check_free_space(folder, plan.disk_bytes, plan.disk_free)
    return plan


def provenance(plan: MergePlan, files: dict[str, str], nonfinite: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``hubmerge.json`` records: enough to audit and reproduce the merge. No timestamps, no tokens.

    ``nonfinite``: the policy and any NaN/Inf the executor counted (sources, overflowing casts)."""
    return {
        "hubmerge_version": __version__,
        "name": plan.name,
        "recipe_file": plan.recipe_file,
        "recipe": plan.recipe,
        "method": plan.method,
        "dtype": plan.out_dtype,
        "sources": [
            {**s.to_dict(), "format": ck.format, "files": ck.files, "weight": w}
            for s, ck, w in zip(plan.sources, plan.checkpoints, plan.weights, strict=True)
        ],
        "weights": plan.weights,
        "tensors": len(plan.tensors),
        "dropped_aliases": plan.dropped_aliases,
        **({"fetch": plan.fetch} if any(s.repo for s in plan.sources) else {}),
        "nonfinite": nonfinite or {"policy": plan.nonfinite, "sources": [], "output": []},
        **plan.extra_provenance,
        "files": dict(sorted(files.items())),
    }
