"""Log-likelihood of continuations given contexts, scored the way lm-evaluation-harness scores them.

Tokenisation follows lm-eval 0.4.x's HF backend (``HFLM._encode_pair`` and ``loglikelihood``) to the
token, so that predictions can be compared with lm-eval's example for example:

- trailing whitespace of the context moves to the start of the continuation;
- ``whole = encode(context + continuation)``, ``context = encode(context)`` and the continuation is
  ``whole[len(context):]``, so the split falls where the joint encoding puts it;
- ``encode`` uses the tokenizer's own special-token default (lm-eval's ``add_bos_token=None``), except
  for strings that already start with the prefix token's text;
- an empty context becomes the prefix token (BOS, else EOS) unless the continuation starts with it;
- inputs longer than the model's window lose tokens on the left: ``(ctx + cont)[-(max_length + 1):][:-1]``.

What differs is how the work is done. Requests are sorted by their input tokens and packed into rows
as prefix trees: a token that several requests' inputs share (the context of a question's choices,
the first words of a minimal pair) appears once in the row, and a 4D attention mask lets each token
see only its own path from the root, with its depth as position id. One forward pass then scores a
whole tree, with the shared tokens computed once. Logits are computed only where a continuation token
is scored (``logits_to_keep``), and log-probabilities are ``logit - logsumexp`` in float32, in blocks
that stay in cache, without materialising a log-softmax over the batch. Passes hold a bounded number
of tokens and logits, so memory does not depend on the number of requests.

The results equal a one-request-at-a-time computation up to float32 rounding, which depends on the
shapes each pass computes. On SmolLM2-135M summed log-likelihoods of BLiMP sentences (around -100)
move by up to ~3e-4 between batchings; a float64 run shows lm-eval's own float32 result off by 3e-3
at one position of such a sentence, so agreement closer than that is luck, not a property.

torch and transformers are imported inside functions: the CLI imports this module for fast commands.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge.errors import InvalidValueError, SourceError, TaskDataError
from hubmerge.io.progress import no_transformers_bars

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither the config nor the tokenizer gives a window
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
MAX_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order
# Padded tokens per forward pass when batch_size is None. On a CPU throughput is flat above a few
# hundred tokens per pass and larger passes only cost memory; accelerators want more.
CPU_TOKEN_BUDGET = 1024
ACCELERATOR_TOKEN_BUDGET = 16384
SOFTMAX_ROWS = 16  # rows of logits per log-softmax block: 16 x 50k float32 is 3 MB, about a core's cache
LOGITS_BUDGET = 1 << 25  # float32 logits kept per pass (128 MiB), whatever the vocabulary size
# Requests packed into one row share their common prefixes; a row holds at most this many tokens
# (a longer request gets a row of its own). Every slot attends over the whole row under the mask, so
# wider rows waste attention work on masked pairs; 128 keeps that to a few per cent of a small model.
ROW_TOKENS = 128

Progress = Callable[[int], None]


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # sum of float32 log-softmax of the continuation tokens given the context
    is_greedy: bool  # every continuation token is the argmax (LAMBADA-style accuracy)
    n_tokens: int  # number of continuation tokens scored


# --------------------------------------------------------------------------- model and tokenizer


def load_model(path_or_dir: str | Path, *, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder, in eval mode with gradients off."""
    import torch
    import transformers

    path = Path(path_or_dir).expanduser()
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: not a model folder (no config.json); give a folder saved by save_pretrained")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SourceError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    # transformers 5 renamed torch_dtype= to dtype=.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    from safetensors import SafetensorError

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        with no_transformers_bars(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on a pickle's protocol; the error says more
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **{dtype_kw: torch_dtype}
            )
    except pickle.UnpicklingError as err:
        raise SourceError(
            f"{path}: a PyTorch .bin weight file holds something other than tensors, and hubmerge reads pickles "
            "only with torch.load(weights_only=True); convert it to safetensors from a trusted copy",
            path=path,
        ) from err
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        what = " ".join(str(err).split()) or type(err).__name__
        raise SourceError(
            f"{path}: cannot load the model or its tokenizer ({what}); check that its weight files are complete "
            "(a truncated download: pull it again) and that it has tokenizer files",
            path=path,
        ) from err
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def model_max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase = None) -> int:
    """The context window lm-eval assumes: config attributes, then the tokenizer, then 2048."""
    config = getattr(model, "config", model)
    config = getattr(config, "text_config", None) or config
    for attr in MAX_LENGTH_ATTRS:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty context conditions on (lm-eval's ``prefix_token_id``): BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


class _Encoder:
    """lm-eval's ``tok_encode`` with its default ``add_bos_token=None``, batched for speed."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.prefix_id = prefix_token_id(tokenizer)
        # A string that already starts with the prefix token's text gets no special tokens added.
        self.prefix_text = tokenizer.decode(self.prefix_id) if self.prefix_id is not None else None

    def __call__(self, texts: Sequence[str], *, add_special_tokens: bool | None = None) -> list[list[int]]:
        if not texts:
            return []
        if add_special_tokens is not None:
            return self._batch(list(texts), add_special_tokens)
        plain = [self.prefix_text is not None and t.startswith(self.prefix_text) for t in texts]
        out: list[list[int]] = [[] for _ in texts]
        for flag in (False, True):
            idx = [i for i, p in enumerate(plain) if p is flag]
            encoded = self._batch([texts[i] for i in idx], False if flag else None)
            for i, ids in zip(idx, encoded, strict=True):
                out[i] = ids
        return out

    def _batch(self, texts: list[str], add_special_tokens: bool | None) -> list[list[int]]:
        if not texts:
            return []
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        # verbose=False: no "longer than the maximum sequence length" warning; the scorer truncates
        # the context on the left itself, as lm-eval does.
        return [list(ids) for ids in self.tokenizer(texts, verbose=False, **kwargs)["input_ids"]]


def encode_requests(tokenizer: PreTrainedTokenizerBase, requests: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) per request, as lm-eval's HF backend encodes them."""
    encode = _Encoder(tokenizer)
    pairs = [_as_pair(r) for r in requests]
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in pairs]
    empty = [i for i, (ctx, _) in enumerate(pairs) if ctx == ""]
    if empty and encode.prefix_id is None:
        raise TaskDataError(
            f"request {empty[0]} has an empty context, which conditions on the tokenizer's BOS or EOS token, "
            "and this tokenizer has neither; give the tokenizer a bos_token"
        )
    for i, cont in zip(empty, encode([pairs[i][1] for i in empty], add_special_tokens=False), strict=True):
        _check_continuation(cont, i, pairs[i])
        # The prefix token conditions the first token, unless the continuation already starts with it.
        out[i] = ([encode.prefix_id], cont) if cont[0] != encode.prefix_id else (cont[:1], cont[1:])
    rest = [i for i, (ctx, _) in enumerate(pairs) if ctx != ""]
    contexts, wholes = [], []
    for i in rest:
        ctx, cont = pairs[i]
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:  # lm-eval moves trailing whitespace into the continuation
            ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
        contexts.append(ctx)
        wholes.append(ctx + cont)
    for i, ctx_enc, whole in zip(rest, encode(contexts), encode(wholes), strict=True):
        out[i] = (ctx_enc, whole[len(ctx_enc) :])
    for i, (ctx_enc, cont_enc) in enumerate(out):
        if not ctx_enc or not cont_enc:
            _check_continuation(cont_enc, i, pairs[i])
            raise TaskDataError(f"request {i} ({pairs[i][0][-40:]!r}) has an empty context after encoding")
    return out


def _as_pair(request: Any) -> tuple[str, str]:
    if hasattr(request, "context"):
        return request.context, request.continuation
    context, continuation = request
    return context, continuation


def _check_continuation(cont: list[int], i: int, pair: tuple[str, str]) -> None:
    if not cont:
        raise TaskDataError(
            f"request {i}: continuation {pair[1]!r} encodes to no tokens (context {pair[0][-40:]!r}); "
            "a request must score at least one token"
        )


# --------------------------------------------------------------------------- public scoring


def score_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Any],
    *,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    max_length: int | None = None,
    share_prefix: bool = True,
) -> list[LogLikelihood]:
    """Score ``(context, continuation)`` pairs (or objects with those attributes), in input order.

    ``batch_size`` caps the requests per forward pass; None batches by a token budget. ``progress``
    is called with the number of requests each finished batch completed. ``share_prefix=False``
    runs every request on its own row, exactly as lm-eval batches them (a reference and a fallback).
    """
    pairs = encode_requests(tokenizer, requests)
    return score_tokens(
        model,
        pairs,
        batch_size=batch_size,
        device=device,
        progress=progress,
        max_length=max_length or model_max_length(model, tokenizer),
        share_prefix=share_prefix,
    )


def rolling_loglikelihood(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> list[tuple[float, int]]:
    """(log-likelihood, token count) of whole texts, as lm-eval's ``loglikelihood_rolling``.

    The text is cut into disjoint prediction windows of the model's length; the first conditions on
    the prefix token, each later one on the tokens before it (``get_rolling_token_windows`` with
    ``context_len=1``, then ``make_disjoint_window``). ``progress`` counts finished texts.
    """
    encode = _Encoder(tokenizer)
    window = max_length or model_max_length(model, tokenizer)
    token_lists = encode(list(texts))
    pairs: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    for t, tokens in enumerate(token_lists):
        for pair in _rolling_windows(tokens, encode.prefix_id, window):
            pairs.append(pair)
            owner.append(t)
    remaining = [0] * len(texts)
    for t in owner:
        remaining[t] += 1
    if progress is not None and (empty := sum(1 for n in remaining if n == 0)):
        progress(empty)

    def on_done(indices: list[int]) -> None:
        finished = 0
        for i in indices:
            remaining[owner[i]] -= 1
            finished += remaining[owner[i]] == 0
        if progress is not None and finished:
            progress(finished)

    scores = _score(model, pairs, window, batch_size, device, True, on_done)
    totals = [0.0] * len(texts)
    for t, score in zip(owner, scores, strict=True):
        totals[t] += score.logprob
    return [(totals[t], len(tokens)) for t, tokens in enumerate(token_lists)]


def _rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix, *tokens[: first - 1]], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_len)
        end = predicted + n_pred
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n_pred : end]))
        predicted += n_pred
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def score_tokens(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    share_prefix: bool = True,
) -> list[LogLikelihood]:
    """Score already-encoded (context tokens, continuation tokens) pairs; the engine under the others."""

    def on_done(indices: list[int]) -> None:
        if progress is not None:
            progress(len(indices))

    return _score(model, pairs, max_length, batch_size, device, share_prefix, on_done)


# --------------------------------------------------------------------------- planning


@dataclass
class _Item:
    """One request: ``seq`` is the model input, positions ``start..len(seq)-1`` predict ``targets``."""

    seq: list[int]
    targets: list[int]  # the continuation tokens, predicted at positions start, start + 1, ...
    start: int


@dataclass
class _Row:
    """Requests packed into one input row as a prefix tree: a token shared by several requests' inputs
    appears once, and sees only the tokens on its own path from the root.

    Slots are in depth-first order, so the slots a slot sees are exactly those ``u`` with
    ``u <= slot < end[u]`` (its ancestors and itself), and its position id is its depth.
    """

    members: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    paths: list[list[int]] = field(default_factory=list)  # per member: the slot of each of its input tokens

    @property
    def width(self) -> int:
        return len(self.tokens)

    def add(self, member: int, seq: list[int], shared_path: list[int]) -> None:
        """Append a request whose first ``len(shared_path)`` tokens are already in the row on that path."""
        start = self.width
        n_new = len(seq) - len(shared_path)
        self.tokens.extend(seq[len(shared_path) :])
        self.depth.extend(range(len(shared_path), len(seq)))
        self.end.extend([0] * n_new)
        path = [*shared_path, *range(start, start + n_new)]
        for slot in path:  # every slot on the path now has this request's tokens in its subtree
            self.end[slot] = self.width
        self.members.append(member)
        self.paths.append(path)


def _items(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> list[_Item]:
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise TaskDataError(f"request {i}: context and continuation must each have at least one token")
        if len(cont) > max_length:
            raise TaskDataError(
                f"request {i}: continuation of {len(cont)} tokens is longer than the model's window ({max_length})"
            )
        full = [*ctx, *cont][-(max_length + 1) :]  # lm-eval truncates from the left
        seq = full[:-1]
        items.append(_Item(seq, list(cont), len(seq) - len(cont)))
    return items


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _plan(items: list[_Item], share: bool, row_tokens: int, row_members: int | None) -> list[_Row]:
    """Pack requests into rows of at most ``row_tokens`` tokens (or one request, if longer) and at most
    ``row_members`` requests.

    Sorted lexicographically, each request shares with the tree built so far exactly its common prefix
    with the request before it, so a row is filled in one pass. Without sharing every request gets its
    own row, as in lm-eval. Rows come out longest first, like lm-eval's Collator: padding stays small
    and memory peaks at once.
    """
    if not share:
        rows = []
        for i, it in enumerate(items):
            rows.append(_Row())
            rows[-1].add(i, it.seq, [])
        return sorted(rows, key=lambda r: (-r.width, r.members[0]))
    rows: list[_Row] = []
    row, prev = _Row(), None
    for i in sorted(range(len(items)), key=lambda i: items[i].seq):
        seq = items[i].seq
        shared = _common_prefix(items[prev].seq, seq) if row.members else 0
        full = row_members is not None and len(row.members) >= row_members
        if row.members and (full or row.width + len(seq) - shared > row_tokens):
            rows.append(row)
            row, shared = _Row(), 0
        row.add(i, seq, row.paths[-1][:shared] if shared else [])
        prev = i
    if row.members:
        rows.append(row)
    return sorted(rows, key=lambda r: (-r.width, r.members[0]))


def _chunks(rows: list[_Row], items: list[_Item], batch_size: int | None, budget: int, logit_rows: int):
    """Consecutive rows per forward pass, within the batch size or the token and logits budgets."""
    chunks: list[list[_Row]] = []
    current: list[_Row] = []
    members = scored = 0
    for row in rows:  # widest first, so current[0].width is the padded row length
        n_scored = sum(len(items[m].targets) for m in row.members)
        width = current[0].width if current else row.width
        # Packed rows need a [width, width] mask each: keep them out of passes padded for long requests
        # (rows wider than ROW_TOKENS hold one request, and a pass of those needs no mask).
        if current and (row.width > ROW_TOKENS) != (width > ROW_TOKENS):
            fits = False
        elif batch_size is not None:
            fits = members + len(row.members) <= batch_size
        else:
            fits = (len(current) + 1) * width <= budget and scored + n_scored <= logit_rows
        if current and not fits:
            chunks.append(current)
            current, members, scored = [], 0, 0
        current.append(row)
        members += len(row.members)
        scored += n_scored
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------- running


@dataclass
class _Api:
    """What this model's forward takes (the names moved across transformers versions)."""

    keep_kw: str | None  # logits_to_keep (or num_logits_to_keep before transformers 4.50)
    bool_keep: bool  # logits_to_keep takes a [batch, seq] boolean mask: logits of exactly the scored positions
    can_pack: bool  # takes a 4D attention mask and position ids, so requests can share a row


def _api(model: PreTrainedModel, device: str) -> _Api:
    """Inspect the forward signature, and probe once whether ``logits_to_keep`` takes a boolean mask."""
    import torch

    params = inspect.signature(model.forward).parameters
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    config = model.config
    can_pack = (
        "position_ids" in params  # models that derive positions from the mask (ALiBi) cannot pack
        and getattr(config, "_attn_implementation", "eager") in ("sdpa", "eager")  # they honour a 4D mask
        and not getattr(config, "is_encoder_decoder", False)
    )
    bool_keep = False
    if keep_kw == "logits_to_keep":  # a probe: older versions index with the mask and return a 4D tensor
        try:
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            keep = torch.tensor([[False, True]], device=device)
            logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
            bool_keep = tuple(logits.shape[:-1]) == (1,)
        except (TypeError, ValueError, IndexError, RuntimeError):
            bool_keep = False
    return _Api(keep_kw, bool_keep, can_pack)


def _score(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    batch_size: int | None,
    device: str | None,
    share: bool,
    on_done: Callable[[list[int]], None],
) -> list[LogLikelihood]:
    import torch

    if batch_size is not None and batch_size < 1:
        raise InvalidValueError(
            f"batch size {batch_size}: give a positive number of requests per forward pass", field="batch_size"
        )
    items = _items(pairs, max_length)
    if not items:
        return []
    device = device or str(next(model.parameters()).device)
    with torch.inference_mode():
        api = _api(model, device)
        window = getattr(model.config, "sliding_window", None)
        # A custom mask replaces sliding-window masks: pack only while every input fits the window.
        share = share and api.can_pack and not (window and any(len(it.seq) > window for it in items))
        budget = CPU_TOKEN_BUDGET if torch.device(device).type == "cpu" else ACCELERATOR_TOKEN_BUDGET
        head = model.get_output_embeddings()
        logit_rows = max(LOGITS_BUDGET // (head.weight.shape[0] if head is not None else 65536), 1)
        logprob = torch.zeros(len(items), dtype=torch.float64)
        misses = torch.zeros(len(items), dtype=torch.long)
        rows = _plan(items, share, ROW_TOKENS, batch_size)
        for chunk in _chunks(rows, items, batch_size, budget, logit_rows):
            _run(model, api, items, chunk, device, logprob, misses)
            on_done([m for row in chunk for m in row.members])
    return [
        LogLikelihood(float(lp), bool(miss == 0), len(it.targets))
        for lp, miss, it in zip(logprob.tolist(), misses.tolist(), items, strict=True)
    ]


def _run(model, api, items, chunk, device, logprob, misses) -> None:  # noqa: ANN001
    """One forward pass over a chunk of rows, right-padded; adds each request's log-probabilities.

    Rows holding one request run as lm-eval runs them: no mask, positions from 0. Packed rows get a
    4D mask in which each slot sees its ancestors in the prefix tree and itself, and its depth as
    position id. A padding slot sees only itself.
    """
    import torch

    n_rows, width = len(chunk), max(row.width for row in chunk)
    ids = torch.zeros((n_rows, width), dtype=torch.long)
    depth = torch.zeros((n_rows, width), dtype=torch.long)
    end = torch.arange(1, width + 1).repeat(n_rows, 1)
    rows, slots, targets, owners = [], [], [], []
    for r, row in enumerate(chunk):
        ids[r, : row.width] = torch.tensor(row.tokens)
        depth[r, : row.width] = torch.tensor(row.depth)
        end[r, : row.width] = torch.tensor(row.end)
        for m, path in zip(row.members, row.paths, strict=True):
            it = items[m]
            rows.extend([r] * len(it.targets))
            slots.extend(path[it.start :])  # the slots whose logits predict the continuation
            targets.extend(it.targets)
            owners.extend([m] * len(it.targets))
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": False}
    packed = any(len(row.members) > 1 for row in chunk)
    if packed:
        dtype = next(model.parameters()).dtype
        q = torch.arange(width)
        visible = (q[None, None, :] <= q[None, :, None]) & (q[None, :, None] < end[:, None, :])  # [row, query, key]
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype)
        mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
        kwargs.update(attention_mask=mask.to(device), position_ids=depth.to(device))
    rows_t, slots_t = torch.tensor(rows), torch.tensor(slots)
    with _eager_attention(model, packed):
        if api.bool_keep:
            need = torch.zeros((n_rows, width), dtype=torch.bool)
            need[rows_t, slots_t] = True
            logits = model(**kwargs, logits_to_keep=need.to(device)).logits  # [scored slots, vocab], row-major
            index = (need.flatten().cumsum(0) - 1)[rows_t * width + slots_t]
        else:
            first = int(slots_t.min())
            logits = _forward(model, api, width - first, width, **kwargs)
            index = rows_t * (width - first) + slots_t - first
            logits = logits.reshape(-1, logits.shape[-1])
    _accumulate(logits, index.to(logits.device), targets, owners, logprob, misses)


@contextmanager
def _eager_attention(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Run packed rows with the model's eager attention instead of SDPA.

    With an arbitrary mask, PyTorch's CPU SDPA kernel rounds differently from its causal path, and
    models with very large early activations (SmolLM2) then move a log-likelihood by up to 2e-3 from
    what lm-eval computes on the unpacked request; eager attention stays within ~3e-4 there, at the
    same speed for rows of ROW_TOKENS. transformers reads the setting at every forward.
    """
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if not enabled or previous != "sdpa":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def _forward(model: PreTrainedModel, api: _Api, keep: int, width: int, **kwargs: Any) -> Any:
    """Logits of the last ``keep`` positions.

    The positions go in as an index tensor, not an int: an int slices the hidden states into a
    non-contiguous view, and the output projection then runs as a batched matmul that reads the whole
    embedding matrix once per row (several times slower on a CPU than one matmul).
    """
    import torch

    if api.keep_kw == "logits_to_keep":
        kwargs[api.keep_kw] = torch.arange(width - keep, width, device=kwargs["input_ids"].device)
    elif api.keep_kw is not None:  # transformers < 4.50 takes an int only
        kwargs[api.keep_kw] = keep
    logits = model(**kwargs).logits
    return logits if api.keep_kw is not None else logits[:, -keep:]


def _accumulate(logits, index, targets, owners, logprob, misses) -> None:  # noqa: ANN001
    """Add log p(target) to each owner's sum, from row ``index[i]`` of ``logits`` for target ``i``.

    log p = logit[target] - logsumexp(logits), the float32 log-softmax at the target, computed per block
    of rows so that the passes over the vocabulary stay in cache; argmax comes from the same pass as
    the maximum. The logits are overwritten.
    """
    import torch

    target = torch.tensor(targets, dtype=torch.long, device=logits.device)
    picked = logits[index, target].float()
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    argmax = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for i in range(0, logits.shape[0], SOFTMAX_ROWS):
        block = logits[i : i + SOFTMAX_ROWS].float()  # a view when the model computes in float32
        top, argmax[i : i + SOFTMAX_ROWS] = block.max(dim=-1)
        lse[i : i + SOFTMAX_ROWS] = top + block.sub_(top[:, None]).exp_().sum(dim=-1).log()
    values = picked - lse[index]
    greedy = argmax[index] == target
    owner = torch.tensor(owners, dtype=torch.long)
    logprob.index_add_(0, owner, values.double().cpu())
    misses.index_add_(0, owner, (~greedy).long().cpu())


def packing_stats(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[Any], *, max_length: int = DEFAULT_MAX_LENGTH
) -> dict[str, int]:
    """Token positions a forward pass computes for these requests: one row each (lm-eval) and packed.

    Needs no model: it shows how much prefix sharing saves on a task before running it.
    """
    items = _items(encode_requests(tokenizer, requests), max_length)
    return {
        "requests": len(items),
        "plain_tokens": sum(len(it.seq) for it in items),
        "packed_tokens": sum(row.width for row in _plan(items, True, ROW_TOKENS, None)),
    }
