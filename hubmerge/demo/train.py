"""Train a tiny causal LM and keep its checkpoints: the trajectory ``hubmerge demo`` merges.

The demo has to work offline and in well under a minute on two CPU cores, yet produce what real
pretraining runs (Pythia, OLMo, LLM-jp) publish: a folder of checkpoints of one model, saved at
regular steps, whose downstream scores wobble. So this trains a few-hundred-thousand-parameter
Llama (or GPT-NeoX, Pythia's shape) on the toy grammar of :mod:`hubmerge.demo.grammar`, or on any text
file, and saves ``step{N}/`` folders exactly as ``save_pretrained`` writes them on the Hub.

Everything is seeded, and the data order is fixed, so one seed gives bit-identical checkpoints on
one machine: the demo's numbers can be reproduced, and tests can compare hashes.

This module imports torch and transformers at the top; only ``hubmerge demo`` imports it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

from hubmerge.demo.grammar import Grammar
from hubmerge.errors import OutputError, RecipeError, SourceError
from hubmerge.io.files import atomic_write
from hubmerge.io.progress import no_transformers_bars

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 in both tokenizer kinds
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
ARCHS = ("llama", "gpt_neox")
SCHEDULES = ("constant", "cosine")
_STEP_DIR = re.compile(r"step\d+")


def build_tokenizer(
    texts: Iterable[str], kind: str = "word", vocab_size: int | None = None, max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A fast tokenizer trained on ``texts``, with <unk>, <s>, </s>, <pad> as ids 0-3.

    ``word`` keeps every whitespace-separated word (the most frequent ``vocab_size`` of them when
    given), ordered by frequency and then alphabetically so the ids never depend on iteration
    order: right for the toy grammar, whose vocabulary is closed. ``bpe`` learns a byte-level BPE
    (``vocab_size`` defaults to 4096) for open text, where a word list would be mostly <unk>.

    No special tokens are added on encoding: a scorer prepends <s> itself, as for Pythia.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "word":
        counts = Counter(word for text in texts for word in text.split())
        words = sorted((w for w in counts if w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            words = words[: max(0, vocab_size - len(SPECIAL_TOKENS))]
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size or 4096,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        raise RecipeError(f"unknown tokenizer kind {kind!r}; use 'word' or 'bpe'")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
    )


def build_config(arch: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int):
    """A transformers config for a tiny model of the given shape; ``gpt_neox`` mirrors Pythia.

    The initialisation scale is 1/sqrt(d_model) instead of the usual 0.02: at d_model=64, 0.02
    leaves attention nearly uniform for hundreds of steps, and a tied Llama then never learns
    which earlier noun a reflexive must agree with within the demo's budget.
    """
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    common = dict(
        initializer_range=d_model**-0.5,
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=seq_len,
        **special,
    )
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=n_heads, tie_word_embeddings=True)
    if arch == "gpt_neox":
        # Pythia: untied input/output embeddings, parallel residual, rotary on a quarter of each head.
        return GPTNeoXConfig(**common, tie_word_embeddings=False, use_parallel_residual=True)
    raise RecipeError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")


def _pack(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int) -> torch.Tensor:
    """Join ``<s> text </s>`` units into one stream and cut it into ``seq_len`` blocks.

    Each text starts with <s> so that a scorer's "<s> sentence" is what the model saw in training;
    a partial last block is dropped.
    """
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _read_text_file(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read training text {path}: {err}; pass a readable UTF-8 text file") from err
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise SourceError(f"training text {path} is empty; pass a file with one text per line")
    return texts


def _training_texts(
    seed: int, steps: int, batch_size: int, seq_len: int, corpus: list[str] | None, text_file: Path | None
) -> tuple[list[str], list[str], str]:
    """The texts to train on, extra texts the tokenizer must cover, and a label for the record."""
    if text_file is not None:
        return _read_text_file(text_file), [], str(text_file)
    if corpus is not None:
        return list(corpus), [], "corpus"
    # About 10 tokens a sentence with <s> and </s>: one pass over fresh sentences, no repeats.
    texts = Grammar(seed).generate_corpus(max(1000, steps * batch_size * seq_len // 9))
    # The whole closed vocabulary, so that no minimal pair meets <unk> after a short run.
    return texts, [" ".join(Grammar.vocabulary())], "grammar"


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to mix two runs in one folder; with ``force``, remove the old run's checkpoints."""
    old = [p for p in out_dir.glob("step*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    if (old or (out_dir / "trajectory.json").exists()) and not force:
        raise OutputError(f"{out_dir} already holds a trajectory; choose another folder or pass force")
    for path in old:
        if any(path.iterdir()) and not (path / "config.json").exists():
            raise OutputError(f"{path} is not a checkpoint folder; refusing to delete it, choose another folder")
        shutil.rmtree(path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out_dir}: {err}; choose a writable folder") from err


def _save_checkpoint(model, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """``save_pretrained`` both, naming the tokenizer class as transformers 4.x readers know it."""
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write checkpoint {path}: {err}; free space or choose another folder") from err


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def train_trajectory(
    out_dir: Path,
    *,
    steps: int = 300,
    save_every: int = 25,
    seed: int = 0,
    corpus: list[str] | None = None,
    text_file: Path | None = None,
    tokenizer_kind: str | None = None,
    vocab_size: int | None = None,
    arch: str = "llama",
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seq_len: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int | None = None,
    schedule: str = "constant",
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Path]:
    """Train a tiny causal LM and save ``out_dir/step{N}/`` every ``save_every`` steps (and at the end).

    The text is the toy grammar's (enough fresh sentences for one pass) unless ``corpus`` or
    ``text_file`` (one text per line) is given. ``tokenizer_kind`` defaults to ``word`` for the
    grammar and a corpus, ``bpe`` for a text file. The LR schedule defaults to constant after a
    warmup of ``steps // 10``: like the middle of a long pretraining run, where checkpoints keep
    wandering instead of settling, which is the regime checkpoint averaging is for.

    ``out_dir/trajectory.json`` records, per checkpoint, the mean training loss since the previous
    one (and every step's loss), with the full configuration. The caller's global torch RNG is left
    as it was. Returns the checkpoint folders, oldest first.
    """
    out_dir = Path(out_dir)
    if steps < 1 or save_every < 1 or batch_size < 1 or seq_len < 2:
        raise RecipeError("steps, save_every and batch_size must be >= 1 and seq_len >= 2")
    if d_model % n_heads:
        raise RecipeError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    if schedule not in SCHEDULES:
        raise RecipeError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if corpus is not None and text_file is not None:
        raise RecipeError("pass either corpus or text_file, not both")
    if arch not in ARCHS:
        raise RecipeError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")

    texts, extra, source = _training_texts(seed, steps, batch_size, seq_len, corpus, text_file)
    kind = tokenizer_kind or ("bpe" if text_file is not None else "word")
    tokenizer = build_tokenizer(texts + extra, kind=kind, vocab_size=vocab_size, max_length=seq_len)
    blocks = _pack(tokenizer, texts, seq_len)
    if len(blocks) == 0:
        raise SourceError(f"the training text ({source}) is shorter than one block of {seq_len} tokens")
    _prepare_out_dir(out_dir, force)
    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)

    with torch.random.fork_rng(devices=[]), no_transformers_bars():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            build_config(arch, len(tokenizer), d_model, n_layers, n_heads, seq_len)
        )
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        factor = partial(_lr_factor, steps=steps, warmup=warmup, schedule=schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        order = torch.Generator().manual_seed(seed)  # the data order, independent of the init

        settings = dict(
            steps=steps, save_every=save_every, seed=seed, arch=arch, d_model=d_model, n_layers=n_layers,
            n_heads=n_heads, seq_len=seq_len, batch_size=batch_size, lr=lr, warmup=warmup, schedule=schedule,
            tokenizer=kind, vocab_size=len(tokenizer), corpus=source, n_texts=len(texts), n_blocks=len(blocks),
            n_params=sum(p.numel() for p in model.parameters()),
        )  # fmt: skip
        record = {"seed": seed, "steps": [], "losses": [], "checkpoints": [], "step_losses": [], "config": settings}
        checkpoints: list[Path] = []
        queue = torch.empty(0, dtype=torch.long)
        window: list[float] = []  # the losses since the last checkpoint
        for step in range(1, steps + 1):
            while len(queue) < batch_size:  # a fresh permutation of the blocks per epoch
                queue = torch.cat([queue, torch.randperm(len(blocks), generator=order)])
            batch, queue = blocks[queue[:batch_size]], queue[batch_size:]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            window.append(loss.item())
            record["step_losses"].append(window[-1])
            if progress is not None:
                progress(step, steps, window[-1])
            if step % save_every == 0 or step == steps:
                path = out_dir / f"step{step}"
                _save_checkpoint(model, tokenizer, path)
                checkpoints.append(path)
                record["steps"].append(step)
                record["losses"].append(sum(window) / len(window))
                record["checkpoints"].append(path.name)
                window = []
                _write_json(out_dir / "trajectory.json", record)
    return checkpoints
