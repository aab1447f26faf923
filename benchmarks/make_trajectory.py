"""Build a synthetic pretraining trajectory: N revisions of a Llama-shaped model as sharded HF folders.

The merge benchmark needs realistic inputs (HF layout, several shards, fp16, ~180M parameters) that
exist offline and are identical on every machine. Weights come from seeded numpy generators, one
stream per (tensor, revision), so a revision does not depend on the sharding or on the others, and
no torch model is ever materialised: the tensor names and shapes come from a model built on the
``meta`` device.

Revision ``r`` of tensor ``w`` is ``base + t_r * drift + noise_r`` with ``t_r = r / (N - 1)``: a slow
drift plus per-step jitter, which is what neighbouring checkpoints look like. Generation walks one
shard at a time and keeps only that shard's base and drift (fp16) plus one revision of it, so peak
memory stays well below one full model in fp32.

Run directly for a one-off build: ``python benchmarks/make_trajectory.py --small``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "trajectory.json"
FORMAT_VERSION = 1  # bump when the generation scheme changes, so stale caches are rebuilt


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the synthetic model and its trajectory; part of the cache key."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_shard_bytes: int
    revisions: int = 16
    seed: int = 1234
    weight_std: float = 0.02
    drift_std: float = 0.002  # total drift over the trajectory, ~10% of the weights
    noise_std: float = 0.001  # per-revision jitter, ~5% of the weights


# ~176.6M parameters, 353 MB per revision in fp16, 3 shards of at most 150 MB.
FULL = ModelSpec("llama-177m", 768, 18, 12, 2048, 32000, max_shard_bytes=150_000_000)
# ~7.3M parameters, 14.5 MB per revision, 3 shards: for smoke tests.
SMALL = ModelSpec("llama-7m", 256, 4, 4, 688, 8000, max_shard_bytes=6_000_000)


def llama_config(spec: ModelSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="float16",
    )


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes exactly as transformers saves them (no hand-written list to drift)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(spec))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Greedy, in state-dict order, like ``save_pretrained``: a tensor never straddles shards."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_filename(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def revision_dirs(root: Path, spec: ModelSpec) -> list[Path]:
    return [root / f"rev{r:02d}" for r in range(spec.revisions)]


def _rng(spec: ModelSpec, tensor_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, FORMAT_VERSION, tensor_index, stream])


def _base_and_drift(spec: ModelSpec, index: int, name: str, shape: tuple[int, ...]):
    rng = _rng(spec, index, 0)
    if len(shape) == 1:  # RMSNorm gains sit around 1, not around 0
        base = 1.0 + rng.standard_normal(shape, dtype=np.float32) * spec.weight_std
    else:
        base = rng.standard_normal(shape, dtype=np.float32) * spec.weight_std
    drift = _rng(spec, index, 1).standard_normal(shape, dtype=np.float32) * spec.drift_std
    return base.astype(np.float16), drift.astype(np.float16)


def _manifest(spec: ModelSpec, root: Path, shards: list[list[str]]) -> dict:
    files = [shard_filename(i, len(shards)) for i in range(len(shards))]
    return {
        "format_version": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "revisions": {d.name: {f: (d / f).stat().st_size for f in files} for d in revision_dirs(root, spec)},
    }


def is_valid(root: Path, spec: ModelSpec) -> bool:
    """A cached trajectory is reused only if it was built from this very spec and no file changed size."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("spec") != dataclasses.asdict(spec):
        return False
    for rev in revision_dirs(root, spec):
        files = manifest["revisions"].get(rev.name)
        if not files or not (rev / "config.json").is_file():
            return False
        if not (rev / "model.safetensors.index.json").is_file():
            return False
        for fname, size in files.items():
            path = rev / fname
            if not path.is_file() or path.stat().st_size != size:
                return False
    return True


def build_trajectory(root: Path, spec: ModelSpec, log=print) -> list[Path]:
    """Return the revision folders under ``root``, generating them unless a valid cache is there."""
    from safetensors.numpy import save_file

    root = Path(root)
    if is_valid(root, spec):
        return revision_dirs(root, spec)
    if root.exists():
        log(f"trajectory cache at {root} is missing or stale: rebuilding it")
        shutil.rmtree(root)
    start = time.perf_counter()
    shapes = tensor_shapes(spec)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    shards = plan_shards(shapes, spec.max_shard_bytes)
    index_of = {name: i for i, name in enumerate(shapes)}
    log(
        f"building {spec.revisions} revisions of {spec.name} ({n_params / 1e6:.1f}M params, "
        f"{2 * n_params / 1e6:.0f} MB fp16, {len(shards)} shards) under {root}"
    )
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    dirs = revision_dirs(tmp, spec)
    config = llama_config(spec)
    weight_map = {name: shard_filename(i, len(shards)) for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    for d in dirs:
        d.mkdir(parents=True)
        config.to_json_file(d / "config.json")
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    for s, names in enumerate(shards):
        fixed = {name: _base_and_drift(spec, index_of[name], name, shapes[name]) for name in names}
        for r, d in enumerate(dirs):
            t = r / max(spec.revisions - 1, 1)
            tensors = {}
            for name, (base, drift) in fixed.items():
                noise = _rng(spec, index_of[name], 2 + r).standard_normal(base.shape, dtype=np.float32)
                w = base.astype(np.float32)
                w += np.float32(t) * drift.astype(np.float32)
                w += np.float32(spec.noise_std) * noise
                tensors[name] = w.astype(np.float16)
            save_file(tensors, d / shard_filename(s, len(shards)), metadata={"format": "pt"})
            del tensors
        log(f"  shard {s + 1}/{len(shards)} written for all revisions ({time.perf_counter() - start:.0f}s)")
        del fixed

    (tmp / MANIFEST).write_text(json.dumps(_manifest(spec, tmp, shards), indent=2) + "\n")
    tmp.rename(root)
    log(f"trajectory ready in {time.perf_counter() - start:.0f}s")
    return revision_dirs(root, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent.parent / "bench-work")
    parser.add_argument("--small", action="store_true", help="tiny model for smoke tests")
    args = parser.parse_args(argv)
    spec = SMALL if args.small else FULL
    dirs = build_trajectory(args.work.resolve() / f"trajectory-{spec.name}", spec)
    print(dirs[0].parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
