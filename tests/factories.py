"""Tiny real checkpoints built from transformers configs, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BLIMP = SHARED / "blimp" / "anaphor_gender_agreement.jsonl"


def tiny_llama_config(tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def save_trajectory(
    root: Path,
    n: int,
    *,
    fmt: str = "single",
    dtype: torch.dtype = torch.float16,
    tie: bool = True,
    seed: int = 0,
) -> list[Path]:
    """``n`` checkpoints of one tiny Llama, drifting like a trajectory, as model folders.

    ``fmt``: "single" (model.safetensors), "sharded" (safetensors + index), "bin" (pytorch_model.bin
    with Pythia-style integer/bool buffers and an aliased tied head), "bin-sharded".
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie)).to(dtype)
    paths = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = root / f"step{(i + 1) * 100}"
        if fmt in ("single", "sharded"):
            model.save_pretrained(path, max_shard_size="40KB" if fmt == "sharded" else "5GB")
        else:
            model.config.save_pretrained(path)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            if tie:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage, as old saves had
            for layer in range(2):
                state[f"model.layers.{layer}.self_attn.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))
                state[f"model.layers.{layer}.self_attn.positions"] = torch.arange(8, dtype=torch.int64)
            path.mkdir(parents=True, exist_ok=True)
            if fmt == "bin":
                torch.save(state, path / "pytorch_model.bin")
            else:
                names = sorted(state)
                half = len(names) // 2
                shards = {
                    "pytorch_model-00001-of-00002.bin": names[:half],
                    "pytorch_model-00002-of-00002.bin": names[half:],
                }
                weight_map = {}
                for fname, keys in shards.items():
                    torch.save({k: state[k] for k in keys}, path / fname)
                    weight_map.update({k: fname for k in keys})
                (path / "pytorch_model.bin.index.json").write_text(
                    json.dumps({"metadata": {}, "weight_map": weight_map})
                )
        paths.append(path)
    return paths


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Everything a folder holds, loaded the plain way, for reference computations."""
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").exists():
        state = {}
        for f in sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())):
            state.update(load_file(path / f))
        return state
    state = {}
    for f in sorted(path.glob("pytorch_model*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def write_recipe(path: Path, sources: list[Path], out: Path, **extra) -> Path:
    import yaml

    data = {"name": "test-merge", "sources": [{"path": str(s)} for s in sources], "output": {"path": str(out)}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_models(root: Path, n: int, texts: list[str]) -> list[Path]:
    """``n`` tiny Llamas with one real byte-level BPE tokenizer: distinct random weights, loadable folders."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hubmerge.demo.train import build_tokenizer

    tok = build_tokenizer(texts, kind="bpe", vocab_size=300, max_length=512)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg)
        path = root / f"step{(i + 1) * 100}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


def terminate_mid_merge(proc, folder: Path, pattern: str = ".out.*", timeout: float = 60) -> str:
    """SIGTERM ``proc`` once its hidden partial output (``pattern`` in ``folder``) appears; its stderr."""
    import signal
    import time

    deadline = time.time() + timeout
    while not list(folder.glob(pattern)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=timeout)[1]
