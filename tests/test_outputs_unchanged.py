"""Merges and sweep windows write the very bytes they wrote before the package was reorganised.

The expected sha256s were recorded with hubmerge 0.1.0 as it stood before the layered layout (commit 05993be),
on sources made here from a seeded legacy numpy stream (stable across numpy versions). torch picks a SIMD kernel
at run time, and its fused multiply-add rounds differently from the scalar code, so the merges run in a child
process with ``ATEN_CPU_CAPABILITY=default``: the scalar kernels, the same bytes on any x86-64 machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import save_file

EXPECTED = {
    "uniform": {"model.safetensors": "68d57412cc97cbc53ee98c1e0ede9db5b535d94f48ca5ac6b04506de79e6725f"},
    "weighted-bf16": {"model.safetensors": "55b23a07fd5de352654773fc7a598e52ce093f7b797beadbcdf20ed3dcc0f060"},
    "ema-f32-sharded": {
        "model-00001-of-00002.safetensors": "ff325c630857207e8797217ba022c76c6ef8fbe4af07e5d79cb7d3bb99adb4b8",
        "model-00002-of-00002.safetensors": "aabfda3c75128f70f4a2d00f67ad33beebe07f26c9f5ee51747fe8cd158152f8",
        "config.json": "74f37a282d50b6b22e371908eb06d3bd85df5f6350d58a78af243a6089c3910c",
        "model.safetensors.index.json": "c71e045d744ab26ab9daa6b31f68b8a31cb645ff00bdcb6522ccb245cd0252a9",
    },
    "w2-step10-step20": {"model.safetensors": "e98b3742bde32ad1e88407b172fc2ec711fc8541fcf89b7005c62ee30a0024b1"},
    "w3-step10-step30": {"model.safetensors": "2c8a5a13fe6b0aab216310cc5226867e22f9eb19648ac4199048a54ab26fe370"},
    "w2-step20-step30": {"model.safetensors": "b09b723033280f74c44df82eb5e89a00e72f4d67343c654e734e64951b19b135"},
    "w3-step20-step40": {"model.safetensors": "92a1cc543868b3b37639e7c72f374e57906468dc4482a2d26545e30b389feb25"},
    "w2-step30-step40": {"model.safetensors": "ac5d7e824d630a790c34b17e206eac44a5fb8ceb409d955298cb9f5dad0ce914"},
    "w3-step30-step50": {"model.safetensors": "1c2e6178ee7c29bb3f262ec4e7b2ebf02361d199b8c36138a83c82d174f553e2"},
    "w2-step40-step50": {"model.safetensors": "9e3f7f187b99ed171fe7df84e2e36692bb1e6709999dce504fbfe021bd308005"},
}

MERGES = {
    "uniform": {},
    "weighted-bf16": {"method": "weighted", "weights": [1, 0, 2, 4, 0.5], "dtype": "bfloat16"},
    "ema-f32-sharded": {"method": "ema", "ema": {"decay": 0.6}, "dtype": "float32"},
}

CHILD = """
import json, sys
from pathlib import Path
from hubmerge.merging.sweep import plan_sweep, run_sweep
from hubmerge.workflows.merge import merge_recipe
root = Path(sys.argv[1])
files = {name: merge_recipe(root / f"{name}.yaml").files for name in json.loads(sys.argv[2])}
sources = sorted((root / "src").iterdir())
for out in run_sweep(plan_sweep(sources, [2, 3], root / "sweep")).outputs:
    files[out.window.name] = out.files
print(json.dumps(files))
"""


def make_sources(root: Path, n: int = 5) -> list[Path]:
    """``n`` checkpoints of a toy model: fp16 and fp32 floats, an integer buffer, a drifting random walk."""
    rng = np.random.RandomState(20261201)
    base = {
        "embed.weight": rng.standard_normal((300, 37)).astype(np.float32),
        "layers.0.mlp.weight": rng.standard_normal((64, 129)).astype(np.float32),
        "layers.0.norm.weight": np.ones(37, dtype=np.float32),
        "layers.0.positions": np.arange(16, dtype=np.int64),
    }
    paths = []
    for i in range(n):
        folder = root / f"step{(i + 1) * 10}"
        folder.mkdir(parents=True)
        state = {}
        for k, v in base.items():
            if v.dtype.kind == "f":
                v = v + rng.standard_normal(v.shape).astype(np.float32) * 0.1
                base[k] = v
                state[k] = v.astype(np.float16 if k != "layers.0.norm.weight" else np.float32)
            else:
                state[k] = v
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float16"}) + "\n")
        paths.append(folder)
    return paths


def test_merges_and_sweep_windows_are_byte_for_byte_what_they_were(tmp_path):
    sources = make_sources(tmp_path / "src")
    for name, extra in MERGES.items():
        output = {"path": str(tmp_path / name), **({"max_shard_size": "40KB"} if name.startswith("ema") else {})}
        data = {"name": name, "sources": [{"path": str(p)} for p in sources], "output": output, **extra}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(list(MERGES))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    files = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(files) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert {k: files[name][k] for k in expected} == expected, name
