"""Reading Hugging Face model folders tensor by tensor, without loading whole checkpoints.

Also the one rule for finding a model's weight files (:func:`weight_layout`), for local folders, Hub listings
and cached snapshots alike.

Safetensors files are read with ``pread`` into caller-owned buffers, so pages of the sources never
accumulate in the process (an mmap would count every touched page in RSS). ``.bin`` checkpoints are
zip-pickles: they are opened with ``torch.load(weights_only=True, mmap=True)``, which refuses
arbitrary objects, and the pages of each chunk are released after it is copied.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubmerge.errors import CorruptSourceError, SourceError
from hubmerge.io.files import sha256_file

HASH_BLOCK = 8 * 2**20  # bytes per read when hashing what no tensor read covers (headers, padding, tails)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_INDEX_FILES = (SAFETENSORS_INDEX, BIN_INDEX)
# How transformers finds a model's weights, in its order of preference: (index file, single file, format).
WEIGHT_FORMATS = (
    (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
    (BIN_INDEX, BIN_SINGLE, "bin"),
)

# Files copied from the newest source next to the merged weights, so the output loads and tokenises.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Output dtypes a recipe may ask for, by their torch names.
DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def torch_dtype(st_dtype: str) -> Any:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": torch.uint64,
        "U32": torch.uint32,
        "U16": torch.uint16,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }[st_dtype]


def st_dtype_of(tdtype: Any) -> str:
    """The safetensors name of a torch dtype."""
    import torch

    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint64: "U64",
        torch.uint32: "U32",
        torch.uint16: "U16",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    if tdtype not in names:
        raise SourceError(f"unsupported tensor dtype {tdtype}")
    return names[tdtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of one checkpoint lives."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint folder
    offset: int = 0  # absolute byte offset in a safetensors file; 0 for .bin
    alias_of: str | None = None  # .bin only: another name sharing the same storage bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class SourceRef:
    """A source checkpoint folder and where it came from (a local folder, or a Hub repo at a revision)."""

    path: Path
    label: str
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    sha256: dict[str, str] | None = None  # Hub sources: each weight file's LFS sha256, verified when read

    @classmethod
    def local(cls, path: str | Path) -> SourceRef:
        """A local folder, labelled by its name."""
        resolved = Path(path).expanduser().resolve()
        return cls(resolved, resolved.name)

    def describe(self) -> str:
        if self.repo:
            sha = f"@{self.commit[:10]}" if self.commit else ""
            return f"{self.repo}:{self.revision}{sha}"
        return str(self.path)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(self.path)}
        if self.repo:
            d.update(repo=self.repo, revision=self.revision, commit=self.commit)
        if self.sha256:
            d["sha256"] = dict(sorted(self.sha256.items()))
        return d


@dataclass
class Checkpoint:
    """One source checkpoint folder: its format, weight files and tensor table."""

    path: Path
    format: str  # "safetensors" | "bin"
    files: list[str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.alias_of is None)


@dataclass(frozen=True)
class WeightLayout:
    """Which files hold a model's weights: its format, index, the weight files present and those missing.

    The one rule for finding weights, shared by local folders, Hub tree listings and cached snapshots.
    """

    format: str | None  # "safetensors" | "bin" | None (no weights)
    index_file: str | None = None
    files: tuple[str, ...] = ()  # weight files the model uses that are present, sorted
    missing: tuple[str, ...] = ()  # weight files its index names that are absent


def weight_layout(names: Collection[str], read_index: Callable[[str], Mapping[str, str]]) -> WeightLayout:
    """The weight files among ``names`` (a folder's or revision's files), as transformers would pick them.

    ``read_index(name)`` returns an index file's ``weight_map``; it is called only when an index is present.
    """
    for index, single, fmt in WEIGHT_FORMATS:
        if index in names:
            shards = sorted(set(read_index(index).values()))
            present = tuple(n for n in shards if n in names)
            return WeightLayout(fmt, index, present, tuple(n for n in shards if n not in names))
        if single in names:
            return WeightLayout(fmt, None, (single,))
    return WeightLayout(None)


def read_weight_map(index_path: Path) -> dict[str, str]:
    """An index file's ``weight_map`` (tensor -> shard file), checked to name plain files only."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(
            f"{index_path}: not a readable weight index ({e}); re-download the checkpoint", path=index_path
        ) from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: 'weight_map' is empty or not a mapping", path=index_path)
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise SourceError(f"{index_path}: shard name {shard!r} is not a plain file name", path=index_path)
    return weight_map


def local_weight_layout(path: Path) -> WeightLayout:
    """The weight layout of a model folder on disk."""
    names = {p.name for p in path.iterdir() if p.is_file()} if path.is_dir() else set()
    return weight_layout(names, lambda index: read_weight_map(path / index))


def _checked_layout(path: Path) -> WeightLayout:
    layout = local_weight_layout(path)
    if layout.format is None:
        raise SourceError(
            f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, "
            f"{BIN_SINGLE})",
            path=path,
        )
    if layout.missing:
        raise SourceError(
            f"{path / str(layout.index_file)} names shard {layout.missing[0]!r}, which is missing from {path}; "
            "the checkpoint is incomplete: re-download it or drop this revision",
            path=path,
        )
    return layout


# A safetensors header longer than this is refused as corrupt (real ones are well under 1 MB).
MAX_HEADER_BYTES = 100_000_000


def header_length(head: bytes, size: int, where: str) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against the file's size."""
    if len(head) < 8 or size < 8:
        raise SourceError(f"{where}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SourceError(f"{where}: corrupt safetensors header (declared length {n})")
    return n


def parse_safetensors_header(raw: bytes, size: int, where: str) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) from a safetensors file's first ``8 + n`` bytes, its framing validated.

    Pure, so that a local file and a remote one (read by range requests) are checked by the same rule.
    """
    n = header_length(raw, size, where)
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise SourceError(f"{where}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise SourceError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype = entry["dtype"]
            numel = math.prod(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"{where}: tensor {name!r} has a malformed header entry ({e})") from e
        if dtype not in ITEMSIZE:
            raise SourceError(f"{where}: tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != numel * ITEMSIZE[dtype] or end > data_size or begin < 0:
            raise SourceError(f"{where}: tensor {name!r} has inconsistent offsets; the file is truncated or corrupt")
    return data_start, header


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """Return (data start offset, header dict) of a safetensors file, validating its framing."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = header_length(head, size, str(file))
            raw = head + f.read(n)
    except OSError as e:
        raise SourceError(f"{file}: cannot read ({e.strerror})") from e
    return parse_safetensors_header(raw, size, str(file))


def tensors_from_headers(
    where: str, headers: Mapping[str, tuple[int, dict[str, Any]]], weight_map: Mapping[str, str] | None
) -> dict[str, TensorInfo]:
    """The tensor table of a checkpoint from its files' parsed headers (file name -> (data start, header))."""
    tensors: dict[str, TensorInfo] = {}
    for fname, (start, header) in headers.items():
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(name) != fname:
                continue  # the index decides which file serves a tensor
            tensors[name] = TensorInfo(
                name, entry["dtype"], tuple(entry["shape"]), fname, start + entry["data_offsets"][0]
            )
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SourceError(
                f"{where}: tensor {missing[0]!r} is listed in {SAFETENSORS_INDEX} under "
                f"{weight_map[missing[0]]!r} but that file does not contain it"
            )
    return tensors


def _safetensors_tensors(path: Path, files: list[str], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    return tensors_from_headers(str(path), {f: read_safetensors_header(path / f) for f in files}, weight_map)


def _load_bin(file: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise SourceError(
            f"{file}: refused to load: it holds objects other than tensors ({str(e).splitlines()[0]}); "
            "hubmerge never unpickles arbitrary code"
        ) from e
    except (OSError, RuntimeError) as e:
        raise SourceError(f"{file}: cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict):
        raise SourceError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def _bin_tensors(path: Path, files: list[str], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    import torch

    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
        for name, t in _load_bin(path / fname).items():
            if not isinstance(t, torch.Tensor):
                raise SourceError(f"{path / fname}: entry {name!r} is not a tensor")
            if weight_map is not None and weight_map.get(name) != fname:
                continue
            tensors[name] = TensorInfo(name, st_dtype_of(t.dtype), tuple(t.shape), fname)
            if t.numel():
                groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
        for names in groups.values():
            # An output head tied to the input embedding is the alias; the embedding is the one kept.
            names.sort(key=lambda n: (is_output_head(n), n))
            for alias in names[1:]:
                info = tensors[alias]
                tensors[alias] = TensorInfo(alias, info.dtype, info.shape, info.file, 0, names[0])
    return tensors


OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")


def is_output_head(name: str) -> bool:
    """Whether ``name`` is a causal LM's output projection, the tensor that tied models share."""
    return name.endswith(OUTPUT_HEADS)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Inspect a model folder: find its weight files and read every tensor's dtype, shape and location."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: not a folder; a source must be a Hugging Face model folder", path=path)
    layout = _checked_layout(path)
    weight_map = read_weight_map(path / layout.index_file) if layout.index_file else None
    files = list(layout.files)
    read = _safetensors_tensors if layout.format == "safetensors" else _bin_tensors
    return Checkpoint(path, str(layout.format), files, read(path, files, weight_map))


_libc: Any = None


def _release_pages(address: int, length: int) -> None:
    """Drop the resident pages of a private file mapping (they are re-read from disk if touched again)."""
    global _libc
    if length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = address - address % page
    end = address + length
    end += (-end) % page
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


class CheckpointReader:
    """Reads byte ranges of a checkpoint's tensors into caller buffers; one per source, one thread.

    ``expected`` (file name -> sha256, a Hub source's LFS hashes) makes the reader hash each of those files in
    the same read that serves the merge: read in byte order, every byte (header, padding, tensors nobody asked
    for, tail) goes through the file's sha256 once, and :meth:`verify` compares the digests after the last
    read. A file read out of byte order is hashed whole by :meth:`verify` instead (a second read of that file).
    """

    def __init__(self, checkpoint: Checkpoint, expected: Mapping[str, str] | None = None) -> None:
        import hashlib

        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}
        self._bin: dict[str, dict[str, Any]] = {}
        self.expected = dict(expected or {})
        self._hash = {f: hashlib.sha256() for f in self.expected}
        self._pos = dict.fromkeys(self.expected, 0)  # bytes of each file hashed so far, from its start
        self._unordered: set[str] = set()

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.checkpoint.path / file, os.O_RDONLY)
        return fd

    def _hash_gap(self, file: str, end: int) -> None:
        """Hash the bytes of ``file`` from where hashing stopped up to ``end`` (a header, padding, a skipped
        tensor, the tail)."""
        fd, pos, h = self._fd(file), self._pos[file], self._hash[file]
        while pos < end:
            block = os.pread(fd, min(HASH_BLOCK, end - pos), pos)
            if not block:
                raise SourceError(f"{self.checkpoint.path / file}: unexpected end of file", path=self.checkpoint.path)
            h.update(block)
            pos += len(block)
        self._pos[file] = pos

    def read_into(self, info: TensorInfo, start: int, count: int, out: Any) -> None:
        """Copy elements ``[start, start+count)`` of tensor ``info`` into the uint8 torch tensor ``out``."""
        itemsize = ITEMSIZE[info.dtype]
        nbytes = count * itemsize
        if self.checkpoint.format == "safetensors":
            fd = self._fd(info.file)
            view = memoryview(out.numpy())[:nbytes]
            got = 0
            offset = info.offset + start * itemsize
            hashing = info.file in self._hash and info.file not in self._unordered
            if hashing and offset < self._pos[info.file]:
                self._unordered.add(info.file)  # read out of byte order: hashed whole by verify()
                hashing = False
            if hashing:
                self._hash_gap(info.file, offset)
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise SourceError(f"{self.checkpoint.path / info.file}: unexpected end of file in {info.name!r}")
                got += n
            if hashing:
                self._hash[info.file].update(view)
                self._pos[info.file] = offset + nbytes
            return
        state = self._bin.get(info.file)
        if state is None:
            if info.file in self.expected:  # a zip-pickle is read by torch, not by us: hash it once first
                self._check(info.file, sha256_file(self.checkpoint.path / info.file))
                self.expected.pop(info.file)
            state = self._bin[info.file] = _load_bin(self.checkpoint.path / info.file)
        tensor = state[info.name]
        flat = tensor.reshape(-1)[start : start + count]
        out[:nbytes].view(tensor.dtype).copy_(flat)
        if tensor.is_contiguous():
            _release_pages(flat.data_ptr(), nbytes)

    def verify(self) -> list[str]:
        """After the last read: finish each expected file's hash and compare; the files hashed in a second read.

        Raises :class:`CorruptSourceError` (exit 5) naming the file whose bytes are not the ones the Hub lists."""
        reread = []
        for file in self.expected:
            path = self.checkpoint.path / file
            if file in self._unordered:
                reread.append(file)
                digest = sha256_file(path)
            else:
                self._hash_gap(file, os.stat(path).st_size)
                digest = self._hash[file].hexdigest()
            self._check(file, digest)
        return reread

    def _check(self, file: str, digest: str) -> None:
        if digest != self.expected[file]:
            path = self.checkpoint.path / file
            raise CorruptSourceError(
                f"{path.name} of {self.checkpoint.path.name} does not match the sha256 the Hub lists for it "
                f"({digest[:12]}... is not {self.expected[file][:12]}...): the cached copy is corrupt; run "
                "`hubmerge pull` again (it replaces corrupt files) and retry; nothing was written",
                path=path,
            )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin.clear()


def byte_order(tensors: Sequence[Any], newest: Checkpoint) -> list[Any]:
    """Plan tensors in the byte order of the newest source's files (file by file, offset by offset): the order
    that reads each file front to back, so it can be hashed in the same read (and streamed)."""
    rank = {name: i for i, name in enumerate(newest.files)}
    return sorted(tensors, key=lambda t: (rank[newest.tensors[t.name].file], newest.tensors[t.name].offset))


SAMPLE_BYTES = 64 * 2**10


def _samples(path: Path, size: int) -> bytes:
    """The first, middle and last 64 KiB of a file: two checkpoints of one run differ in all three."""
    out = bytearray()
    with path.open("rb") as f:
        for at in (0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)):
            f.seek(at)
            out += f.read(SAMPLE_BYTES)
    return bytes(out)


def identical_weights(checkpoints: Sequence[Checkpoint]) -> dict[int, int]:
    """Sources whose weight files are bit-identical to an earlier source's: ``{later index: earlier index}``.

    The same folder listed twice is found by its resolved path; two folders by their bytes. Only folders whose
    weight files have the same names and sizes and agree on three 64 KiB samples per file are hashed in full,
    so distinct checkpoints cost a few reads, and only a real duplicate costs a read of both.
    """
    found: dict[int, int] = {}
    resolved = [ck.path.resolve() for ck in checkpoints]
    sizes = [tuple((f, (ck.path / f).stat().st_size) for f in ck.files) for ck in checkpoints]
    samples: dict[int, tuple[bytes, ...]] = {}
    digests: dict[int, tuple[str, ...]] = {}

    def sample(i: int) -> tuple[bytes, ...]:
        if i not in samples:
            samples[i] = tuple(_samples(checkpoints[i].path / f, n) for f, n in sizes[i])
        return samples[i]

    def digest(i: int) -> tuple[str, ...]:
        if i not in digests:
            digests[i] = tuple(sha256_file(checkpoints[i].path / f) for f, _ in sizes[i])
        return digests[i]

    for j in range(len(checkpoints)):
        for i in range(j):
            if i in found:
                continue
            if resolved[i] == resolved[j] or (
                sizes[i] == sizes[j] and sample(i) == sample(j) and digest(i) == digest(j)
            ):
                found[j] = i
                break
    return found
