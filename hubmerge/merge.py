"""Executing a merge plan: stream every output tensor from all sources, accumulate in float32, write.

Three threads share the work so that reading overlaps arithmetic and writing:

- a reader fills a small pool of byte buffers, one (tensor chunk, source) at a time, in plan order;
- the main thread converts each buffer to float32 in cache-sized blocks and accumulates it with the
  source's weight (``acc += w * x``), then casts the finished chunk to the output dtype;
- a writer appends finished chunks to the current shard and hashes them.

Large tensors are processed in chunks of ``CHUNK_ELEMS`` elements, so peak memory is a constant set
of buffers: it grows neither with the number of sources nor with the model's size. The arithmetic is
elementwise in a fixed order (source 0, 1, ...), so the result is bit-identical whatever the thread
count. One torch thread is the default: the loop is memory-bound and on small machines a second
compute thread only competes with the reader.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import ITEMSIZE, Checkpoint, CheckpointReader, TensorInfo, torch_dtype
from .errors import HubmergeError, SourceError
from .plan import BLOCK_ELEMS, READ_BUFFERS, WRITE_BUFFERS, MergePlan, TensorPlan
from .progress import byte_progress
from .writer import OutputDir, ShardWriter, sha256_file

PROVENANCE_FILE = "hubmerge.json"
_STOP = object()


@dataclass
class MergeResult:
    output: Path
    files: dict[str, str]  # file name -> sha256
    seconds: float
    bytes_read: int
    bytes_written: int
    pushed: Any = None  # a push.PushResult when the recipe's output.push uploaded the merge
    evaluation: Any = None  # an evaluation.EvalResult when the recipe has an evaluate: block
    card: Path | None = None  # the model card (README.md) written after that evaluation


class _Reader(threading.Thread):
    """Reads ``(source index, tensor, first element, count)`` jobs into pooled buffers, in the order they are used.

    ``bytes_read`` counts what was actually read, so callers (and tests) can check that the work shared by
    a sweep really reads each source once.
    """

    def __init__(
        self, checkpoints: list[Checkpoint], jobs: Iterable[tuple[int, TensorInfo, int, int]], buffers: list[Any]
    ) -> None:
        super().__init__(name="hubmerge-reader", daemon=True)
        self.jobs = jobs
        self.free: queue.Queue[Any] = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.filled: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.readers = [CheckpointReader(ck) for ck in checkpoints]
        self.bytes_read = 0

    def run(self) -> None:
        try:
            for s, info, start, count in self.jobs:
                buf = self._get_free()
                if buf is None:
                    return
                self.readers[s].read_into(info, start, count, buf)
                self.bytes_read += count * ITEMSIZE[info.dtype]
                self.filled.put(buf)
        except BaseException as e:  # handed to the main thread, which raises it
            self.filled.put(e)
        finally:
            for r in self.readers:
                r.close()

    def _get_free(self) -> Any:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def next(self) -> Any:
        item = self.filled.get()
        if isinstance(item, BaseException):
            raise item
        return item


class _Writer(threading.Thread):
    """Writes finished chunks to shard files in order and returns buffers to the compute thread.

    Messages name their shard by path, so several shards (one per sweep window) can be open at once.
    """

    def __init__(self, buffers: list[Any], shard_writer: type[ShardWriter] = ShardWriter) -> None:
        super().__init__(name="hubmerge-writer", daemon=True)
        self.free: queue.Queue[Any] = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.todo: queue.Queue[Any] = queue.Queue()
        self.shard_writer = shard_writer
        self.hashes: dict[Path, str] = {}
        self.error: BaseException | None = None
        self._shards: dict[Path, ShardWriter] = {}

    def run(self) -> None:
        while (msg := self.todo.get()) is not _STOP:
            if self.error is not None:
                if msg[0] == "data":
                    self.free.put(msg[2])
                continue
            try:
                if msg[0] == "open":
                    self._shards[msg[1]] = self.shard_writer(*msg[1:])
                elif msg[0] == "data":
                    self._shards[msg[1]].write(msg[2][: msg[3]].numpy())
                    self.free.put(msg[2])
                else:
                    self.hashes[msg[1]] = self._shards.pop(msg[1]).close()
            except BaseException as e:
                self.error = e
                if msg[0] == "data":
                    self.free.put(msg[2])
                self._abort()
        self._abort()

    def _abort(self) -> None:
        for shard in self._shards.values():
            shard.abort()
        self._shards.clear()

    def take(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.free.get()


def accumulate_blocks(src: Any, targets: list[tuple[Any, float, bool]], tmp: Any, block: int) -> None:
    """For each ``(acc, weight, first)``: ``acc = w * src`` or ``acc += w * src``, in float32, block by block.

    The source is converted to float32 once per cache-sized block (into ``tmp``) and added to every
    target while the block is in cache: a merge has one target, a sweep one per open window. The
    operations, and so the rounding, are the same whatever the number of targets.
    """
    import torch

    count = src.numel()
    is_f32 = src.dtype == torch.float32
    for b0 in range(0, count, block):
        b1 = min(count, b0 + block)
        # fp16/bf16 -> fp32 conversion runs vectorised into a cache-resident block
        x = src[b0:b1] if is_f32 else tmp[: b1 - b0].copy_(src[b0:b1])
        for acc, weight, first in targets:
            a = acc[b0:b1]
            if first:
                a.copy_(x)
                a.mul_(weight)
            else:
                a.add_(x, alpha=weight)


def _accumulate(acc: Any, src: Any, tmp: Any, weight: float, first: bool, on_cpu: bool) -> None:
    """``acc = w * src`` (first source) or ``acc += w * src``, in float32, cache-block by cache-block."""
    import torch

    if not on_cpu:
        x = src.to(acc.device, non_blocking=False).to(torch.float32)
        if first:
            torch.mul(x, weight, out=acc)
        else:
            acc.add_(x, alpha=weight)
        return
    accumulate_blocks(src, [(acc, weight, first)], tmp, BLOCK_ELEMS)


def _finish_sidecars(plan: MergePlan, folder: Path) -> None:
    newest = plan.checkpoints[-1].path
    for name in plan.sidecar_files:
        shutil.copyfile(newest / name, folder / name)
    config = folder / "config.json"
    if plan.out_dtype and config.is_file():
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = plan.out_dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_index(plan: MergePlan, folder: Path) -> None:
    if len(plan.shards) == 1:
        return
    index = {
        "metadata": {"total_size": plan.bytes_written},
        "weight_map": {t.name: s.file for s in plan.shards for t in s.tensors},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def provenance(plan: MergePlan, files: dict[str, str]) -> dict[str, Any]:
    """What ``hubmerge.json`` records: enough to audit and reproduce the merge. No timestamps, no tokens."""
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
        **plan.extra_provenance,
        "files": dict(sorted(files.items())),
    }


def finish_output(plan: MergePlan, folder: Path, shard_hashes: dict[str, str]) -> dict[str, str]:
    """Write the index, sidecar files and ``hubmerge.json`` next to finished shards; return every file's hash."""
    files = dict(shard_hashes)
    _write_index(plan, folder)
    _finish_sidecars(plan, folder)
    for p in sorted(folder.iterdir()):
        if p.name not in files:
            files[p.name] = sha256_file(p)
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance(plan, files), indent=2) + "\n")
    return files


def read_jobs(
    tensors: list[TensorPlan], checkpoints: list[Checkpoint], sources: Iterable[int], chunk: int
) -> Iterator[tuple[int, TensorInfo, int, int]]:
    """What the reader reads, in the order the compute loop consumes it: tensor, chunk, then source."""
    sources = list(sources)
    for t in tensors:
        for start in range(0, max(t.numel, 1), chunk):
            count = min(chunk, t.numel - start)
            for s in sources:
                yield s, checkpoints[s].tensors[t.name], start, count


def _stream(plan: MergePlan, folder: Path, reader: _Reader, writer: _Writer, acc: Any, tmp: Any, bar: Any) -> None:
    """The compute loop: tensors in plan order, chunks in order, sources in order."""
    import torch

    on_cpu = acc.device.type == "cpu"
    total = len(plan.tensors)
    chunk = plan.chunk_elems
    done = 0
    for shard in plan.shards:
        entries = [(t.name, t.out_dtype, t.shape, t.out_nbytes) for t in shard.tensors]
        path = folder / shard.file
        writer.todo.put(("open", path, entries, {"format": "pt"}))
        for t in shard.tensors:
            infos = [ck.tensors[t.name] for ck in plan.checkpoints]
            for start in range(0, max(t.numel, 1), chunk):
                count = min(chunk, t.numel - start)
                out = writer.take()
                nbytes = count * ITEMSIZE[t.out_dtype]
                if t.floating:
                    for s, (info, w) in enumerate(zip(infos, plan.weights, strict=True)):
                        buf = reader.next()
                        src = buf[: count * ITEMSIZE[info.dtype]].view(torch_dtype(info.dtype))
                        _accumulate(acc[:count], src, tmp, w, s == 0, on_cpu)
                        reader.free.put(buf)
                        bar.advance(count * ITEMSIZE[info.dtype])
                    out[:nbytes].view(torch_dtype(t.out_dtype)).copy_(acc[:count])
                else:
                    first = reader.next()
                    for s in range(1, len(infos)):
                        other = reader.next()
                        if not torch.equal(first[:nbytes], other[:nbytes]):
                            raise SourceError(
                                f"non-floating tensor {t.name!r} differs between {plan.sources[0].describe()} "
                                f"and {plan.sources[s].describe()}; integer and boolean buffers must be "
                                "identical in every source"
                            )
                        reader.free.put(other)
                    out[:nbytes].copy_(first[:nbytes])
                    reader.free.put(first)
                    bar.advance(nbytes * len(infos))
                writer.todo.put(("data", path, out, nbytes))
            done += 1
            bar.update(description=f"merging {len(plan.sources)} checkpoints: {done}/{total} tensors")
        writer.todo.put(("close", path))


def execute(plan: MergePlan, *, force: bool = False, quiet: bool = False, threads: int = 1) -> MergeResult:
    """Carry out a plan; the output appears at ``plan.output`` only if every step succeeded."""
    import torch

    began = time.perf_counter()
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HubmergeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    in_item = max(ITEMSIZE[t.dtype] for ck in plan.checkpoints for t in ck.tensors.values())
    out_item = max(ITEMSIZE[t.out_dtype] for t in plan.tensors)
    chunk = plan.chunk_elems
    with torch_threads(threads):
        buffers = [torch.empty(chunk * in_item, dtype=torch.uint8) for _ in range(READ_BUFFERS)]
        jobs = read_jobs(plan.tensors, plan.checkpoints, range(len(plan.checkpoints)), chunk)
        reader = _Reader(plan.checkpoints, jobs, buffers)
        writer = _Writer([torch.empty(chunk * out_item, dtype=torch.uint8) for _ in range(WRITE_BUFFERS)])
        acc = torch.empty(chunk, dtype=torch.float32, device=device)
        tmp = torch.empty(min(chunk, BLOCK_ELEMS), dtype=torch.float32)
        out_dir = OutputDir(plan.output, force=force)
        with (
            out_dir as folder,
            byte_progress(f"merging {len(plan.sources)} checkpoints", plan.bytes_read, quiet=quiet) as bar,
        ):
            reader.start()
            writer.start()
            try:
                _stream(plan, folder, reader, writer, acc, tmp, bar)
            finally:
                reader.stop.set()
                writer.todo.put(_STOP)
                writer.join()
            if writer.error is not None:
                raise writer.error
            files = finish_output(plan, folder, {p.name: h for p, h in writer.hashes.items()})
            out_dir.commit()
    return MergeResult(plan.output, files, time.perf_counter() - began, plan.bytes_read, plan.bytes_written)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on ``n`` torch threads and give the caller back its own count, also on error."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plan_recipe(
    recipe_path: str | Path,
    *,
    device: str = "cpu",
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    quiet: bool = False,
    console: Any = None,
) -> MergePlan:
    """Load a recipe file and build its plan; Hub sources are selected, checked and pulled first."""
    from .errors import RecipeError
    from .plan import build_plan
    from .recipe import HubSources, load_recipe

    recipe, raw = load_recipe(recipe_path)
    where = str(recipe_path)
    if not isinstance(recipe.sources, HubSources):
        return build_plan(recipe, raw_recipe=raw, recipe_file=where, device=device, force=force)
    from .pull import resolve_hub_sources
    from .recipe import check_output_path

    resolved = resolve_hub_sources(recipe.sources, endpoint=endpoint, token=token, quiet=quiet, console=console)
    weights = None
    if recipe.weights is not None:
        if len(recipe.weights) != len(resolved.selected):
            raise RecipeError(
                f"{where}: field 'weights': {len(recipe.weights)} entries but the selector chose "
                f"{len(resolved.selected)} revisions ({', '.join(r.name for r in resolved.selected)})"
            )
        keep = {r.name for r in resolved.kept}
        weights = [w for w, r in zip(recipe.weights, resolved.selected, strict=True) if r.name in keep]
    check_output_path(recipe, where, [s.path for s in resolved.sources])
    plan = build_plan(
        recipe,
        raw_recipe=raw,
        recipe_file=where,
        sources=resolved.sources,
        device=device,
        force=force,
        weights=weights,
    )
    plan.extra_provenance.update(resolved.provenance)
    return plan


def merge_recipe(
    recipe_path: str | Path,
    *,
    force: bool = False,
    quiet: bool = False,
    device: str = "cpu",
    threads: int = 1,
    endpoint: str | None = None,
    token: str | None = None,
) -> MergeResult:
    """``hubmerge merge RECIPE``: plan, check, then stream the merge into ``output.path``."""
    plan = plan_recipe(recipe_path, device=device, force=force, endpoint=endpoint, token=token, quiet=quiet)
    result = execute(plan, force=force, quiet=quiet, threads=threads)
    finish_merge(recipe_path, plan, result, endpoint=endpoint, token=token, quiet=quiet)
    return result


def finish_merge(
    recipe_path: str | Path,
    plan: MergePlan,
    result: MergeResult,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    quiet: bool = False,
) -> MergeResult:
    """What a recipe asks for after the merge: evaluate (``evaluate:``), then push (``output.push``)."""
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)[0]
    if recipe.evaluate is not None:
        from .card import write_card_from_store
        from .evaluation import evaluate_merge

        result.evaluation = evaluate_merge(
            plan, result.output, recipe.evaluate, endpoint=endpoint, token=token, quiet=quiet
        )
        result.card = write_card_from_store(result.output, recipe.evaluate.results)
    push_after_merge(recipe_path, result, endpoint=endpoint, token=token)
    return result


def push_after_merge(
    recipe_path: str | Path, result: MergeResult, *, endpoint: str | None = None, token: str | None = None
) -> Any:
    """The recipe's ``output.push``, if any: upload the merged folder as ``hubmerge push`` would."""
    from .push import push
    from .recipe import load_recipe

    cfg = load_recipe(recipe_path)[0].output.push
    if cfg is None:
        return None
    result.pushed = push(
        result.output,
        cfg.repo,
        branch=cfg.branch,
        private=cfg.private,
        create_pr=cfg.create_pr,
        message=cfg.message,
        endpoint=endpoint,
        token=token,
    )
    return result.pushed
