"""Reading Hugging Face model folders tensor by tensor, without loading whole checkpoints.

Safetensors files are read with ``pread`` into caller-owned buffers, so pages of the sources never
accumulate in the process (an mmap would count every touched page in RSS). ``.bin`` checkpoints are
zip-pickles: they are opened with ``torch.load(weights_only=True, mmap=True)``, which refuses
arbitrary objects, and the pages of each chunk are released after it is copied.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_INDEX_FILES = (SAFETENSORS_INDEX, BIN_INDEX)

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
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


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


def _read_index(path: Path, index_name: str) -> dict[str, str]:
    index_path = path / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{index_path}: not a readable weight index ({e}); re-download the checkpoint") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: 'weight_map' is empty or not a mapping")
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise SourceError(f"{index_path}: shard name {shard!r} is not a plain file name")
        if not (path / shard).is_file():
            raise SourceError(
                f"{index_path} names shard {shard!r}, which is missing from {path}; "
                "the checkpoint is incomplete: re-download it or drop this revision"
            )
    return weight_map


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """Return (data start offset, header dict) of a safetensors file, validating its framing."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{file}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > 100_000_000 or 8 + n > size:
                raise SourceError(f"{file}: corrupt safetensors header (declared length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SourceError(f"{file}: cannot read ({e.strerror})") from e
    except ValueError as e:
        raise SourceError(f"{file}: corrupt safetensors header ({e})") from e
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = entry["dtype"]
        if dtype not in ITEMSIZE:
            raise SourceError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if end - begin != numel * ITEMSIZE[dtype] or end > data_size or begin < 0:
            raise SourceError(f"{file}: tensor {name!r} has inconsistent offsets; the file is truncated or corrupt")
    return data_start, header


def _safetensors_tensors(path: Path, files: list[str], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        start, header = read_safetensors_header(path / fname)
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
                f"{path}: tensor {missing[0]!r} is listed in {SAFETENSORS_INDEX} under "
                f"{weight_map[missing[0]]!r} but that file does not contain it"
            )
    return tensors


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
        raise SourceError(f"{path}: not a folder; a source must be a Hugging Face model folder")
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = _read_index(path, SAFETENSORS_INDEX)
        files = sorted(set(weight_map.values()))
        return Checkpoint(path, "safetensors", files, _safetensors_tensors(path, files, weight_map))
    if (path / SAFETENSORS_SINGLE).is_file():
        return Checkpoint(
            path, "safetensors", [SAFETENSORS_SINGLE], _safetensors_tensors(path, [SAFETENSORS_SINGLE], None)
        )
    if (path / BIN_INDEX).is_file():
        weight_map = _read_index(path, BIN_INDEX)
        files = sorted(set(weight_map.values()))
        return Checkpoint(path, "bin", files, _bin_tensors(path, files, weight_map))
    if (path / BIN_SINGLE).is_file():
        return Checkpoint(path, "bin", [BIN_SINGLE], _bin_tensors(path, [BIN_SINGLE], None))
    raise SourceError(
        f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE})"
    )


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
    """Reads byte ranges of a checkpoint's tensors into caller buffers; one per source, one thread."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}
        self._bin: dict[str, dict[str, Any]] = {}

    def read_into(self, info: TensorInfo, start: int, count: int, out: Any) -> None:
        """Copy elements ``[start, start+count)`` of tensor ``info`` into the uint8 torch tensor ``out``."""
        itemsize = ITEMSIZE[info.dtype]
        nbytes = count * itemsize
        if self.checkpoint.format == "safetensors":
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(self.checkpoint.path / info.file, os.O_RDONLY)
            view = memoryview(out.numpy())[:nbytes]
            got = 0
            offset = info.offset + start * itemsize
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise SourceError(f"{self.checkpoint.path / info.file}: unexpected end of file in {info.name!r}")
                got += n
            return
        state = self._bin.get(info.file)
        if state is None:
            state = self._bin[info.file] = _load_bin(self.checkpoint.path / info.file)
        tensor = state[info.name]
        flat = tensor.reshape(-1)[start : start + count]
        out[:nbytes].view(tensor.dtype).copy_(flat)
        if tensor.is_contiguous():
            _release_pages(flat.data_ptr(), nbytes)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin.clear()
