"""Scoring against an independent, one-request-at-a-time computation on tiny seeded models.

The tokenizer is a real byte-level BPE trained here on a few sentences, so spaces change tokens the way
they do in GPT-2/Llama-3 style vocabularies; the Llama one adds BOS by default (like Llama tokenizers),
the GPT-NeoX one adds nothing (like Pythia's).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hubmerge.errors import SourceError, TaskDataError
from hubmerge.evaluation import scoring
from hubmerge.evaluation.scoring import (
    LogLikelihood,
    encode_requests,
    load_model,
    rolling_loglikelihood,
    score_requests,
    score_tokens,
)

SENTENCES = [
    "The cat sat on the mat.",
    "The dog sat on the log.",
    "A bird can fly over the house.",
    "Plants use sunlight to make food.",
    "Which planet is closest to the sun?",
    "Water freezes at zero degrees.",
    "Katherine can't help herself.",
    "Question: what do plants need?\nAnswer: sunlight and water",
]

REQUESTS = [
    ("Question: Which planet is closest to the sun?\nAnswer:", " Mercury"),
    ("Question: Which planet is closest to the sun?\nAnswer:", " Venus"),
    ("Question: Which planet is closest to the sun?\nAnswer:", " the Earth"),
    ("Question: Which planet is closest to the sun?\nAnswer:", " Mars, the red planet"),
    ("Question: What do plants need?\nAnswer:", " sunlight"),
    ("Question: What do plants need?\nAnswer:", " sun"),
    ("Question: What do plants need?\nAnswer:", " sunlight and water"),
    ("The cat sat on the", " mat."),
    ("The cat sat on the ", "log."),  # trailing space moves to the continuation
    ("", " Katherine can't help herself."),  # BLiMP: empty context
    ("", " Katherine can't help himself."),
    ("", "The dog sat on the log."),
    ("Water", " freezes at zero degrees."),
]


def _tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["llama", "neox"])
def lm(request):
    """(model, tokenizer): a seeded 2-layer model whose logits are peaked enough for argmax to matter."""
    torch.manual_seed(0)
    if request.param == "llama":
        tok = _tokenizer(add_bos=True)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.3,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        tok = _tokenizer(add_bos=False)
        config = GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            initializer_range=0.3,
        )
        model = GPTNeoXForCausalLM(config)
    return model.eval(), tok


def _reference(model, ctx: list[int], cont: list[int], max_length: int = 64) -> tuple[float, bool]:
    """One request alone: a full forward pass, log_softmax, sum over the continuation positions."""
    full = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), dim=-1)
    scored = logp[-len(cont) :]
    target = torch.tensor(cont)
    return float(scored[torch.arange(len(cont)), target].sum()), bool((scored.argmax(-1) == target).all())


def _assert_close(got: list[LogLikelihood], want: list[tuple[float, bool]], n_tokens: list[int]) -> None:
    for i, (g, (logprob, greedy), n) in enumerate(zip(got, want, n_tokens, strict=True)):
        assert g.logprob == pytest.approx(logprob, abs=1e-4), i
        assert g.is_greedy == greedy, i
        assert g.n_tokens == n, i


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_matches_one_at_a_time(lm, share, batch_size):
    model, tok = lm
    pairs = encode_requests(tok, REQUESTS)
    want = [_reference(model, c, t) for c, t in pairs]
    got = score_requests(model, tok, REQUESTS, batch_size=batch_size, share_prefix=share)
    _assert_close(got, want, [len(t) for _, t in pairs])


def test_eager_attention_shares_too(lm):
    model, tok = lm
    pairs = encode_requests(tok, REQUESTS)
    want = [_reference(model, c, t) for c, t in pairs]
    model.config._attn_implementation = "eager"
    try:
        got = score_requests(model, tok, REQUESTS)
    finally:
        model.config._attn_implementation = "sdpa"
    _assert_close(got, want, [len(t) for _, t in pairs])


def test_order_batching_and_grouping_do_not_change_results(lm):
    model, tok = lm
    base = score_requests(model, tok, REQUESTS)
    order = list(reversed(range(len(REQUESTS))))
    shuffled = score_requests(model, tok, [REQUESTS[i] for i in order], batch_size=2)
    for j, i in enumerate(order):
        assert shuffled[j].logprob == pytest.approx(base[i].logprob, abs=1e-5)
        assert shuffled[j].is_greedy == base[i].is_greedy
    alone = [score_requests(model, tok, [r])[0] for r in REQUESTS[:4]]  # no sharing possible
    for a, b in zip(alone, base[:4], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    again = score_requests(model, tok, REQUESTS)
    assert again == base  # deterministic, bit for bit


def test_is_greedy_on_the_models_own_argmax(lm):
    model, tok = lm
    ctx = encode_requests(tok, [("The cat sat on the", " mat.")])[0][0]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    wrong = [*greedy[:2], (greedy[2] + 1) % len(tok)]
    pairs = [(ctx, greedy), (ctx, wrong), (ctx, greedy[:1])]
    got = score_tokens(model, pairs, max_length=64)
    assert [g.is_greedy for g in got] == [True, False, True]
    assert got[1].logprob < got[0].logprob
    _assert_close(got, [_reference(model, c, t) for c, t in pairs], [3, 3, 1])


def test_encoding_follows_lm_eval(lm):
    model, tok = lm
    adds_bos = tok("x")["input_ids"][0] == tok.bos_token_id
    (ctx, cont), (ctx2, cont2) = encode_requests(
        tok, [("The cat sat on the", " mat."), ("The cat sat on the ", "mat.")]
    )
    # The split falls where the joint encoding puts it; a trailing space belongs to the continuation.
    assert ctx + cont == tok("The cat sat on the mat.")["input_ids"]
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx == tok("The cat sat on the")["input_ids"]
    assert (ctx[0] == tok.bos_token_id) == adds_bos
    # Empty context: the prefix token (BOS here) conditions; the continuation gets no special tokens.
    (ectx, econt), (sctx, scont) = encode_requests(tok, [("", " Katherine"), ("", "<s> Katherine")])
    assert ectx == [tok.bos_token_id] and econt == tok(" Katherine", add_special_tokens=False)["input_ids"]
    assert (sctx, scont) == (ectx, econt)  # a continuation starting with the prefix token uses it as context
    # A context that starts with the prefix token's text gets no second BOS.
    bctx, _ = encode_requests(tok, [("<s>The cat", " sat")])[0]
    assert bctx.count(tok.bos_token_id) == 1


def test_empty_context_scores_from_the_prefix_token(lm):
    model, tok = lm
    got = score_requests(model, tok, [("", " Katherine can't help herself.")])[0]
    cont = tok(" Katherine can't help herself.", add_special_tokens=False)["input_ids"]
    logprob, greedy = _reference(model, [tok.bos_token_id], cont)
    assert got.logprob == pytest.approx(logprob, abs=1e-4) and got.is_greedy == greedy
    assert got.n_tokens == len(cont)


@pytest.mark.parametrize("share", [True, False])
def test_left_truncation_to_the_window(lm, share):
    model, tok = lm
    requests = [
        ("Question: Which planet is closest to the sun?\nAnswer:", " Mercury"),
        ("Question: Which planet is closest to the sun?\nAnswer:", " the Earth"),
        ("Plants use sunlight to make food. Water freezes at zero degrees.", " The cat sat"),
    ]
    pairs = encode_requests(tok, requests)
    assert all(len(c) + len(t) > 11 for c, t in pairs)  # every request loses context tokens
    got = score_requests(model, tok, requests, max_length=10, share_prefix=share)
    _assert_close(got, [_reference(model, c, t, max_length=10) for c, t in pairs], [len(t) for _, t in pairs])
    with pytest.raises(TaskDataError, match="longer than the model's window"):
        score_requests(model, tok, [("Water", " freezes at zero degrees.")], max_length=2)


def test_rolling_windows_match_a_direct_computation(lm):
    model, tok = lm
    texts = ["The cat sat on the mat. The dog sat on the log.", "Water freezes.", ""]
    for window in (64, 7):
        got = rolling_loglikelihood(model, tok, texts, max_length=window)
        for text, (logprob, n) in zip(texts, got, strict=True):
            tokens = tok(text)["input_ids"]  # lm-eval: the tokenizer's own special tokens, so BOS for Llama
            x = [tok.bos_token_id, *tokens]  # x[i + 1] is tokens[i]
            want = 0.0
            for a in range(0, len(tokens), window):  # disjoint prediction windows tokens[a:b]
                b = min(a + window, len(tokens))
                inp = x[max(0, b - window) : b]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([inp])).logits[0], -1)[-(b - a) :]
                want += float(logp[torch.arange(b - a), torch.tensor(tokens[a:b])].sum())
            assert n == len(tokens)
            assert logprob == pytest.approx(want, abs=1e-4)
    calls = []
    rolling_loglikelihood(model, tok, texts, max_length=7, progress=calls.append)
    assert sum(calls) == len(texts)


def test_progress_counts_every_request(lm):
    model, tok = lm
    calls = []
    score_requests(model, tok, REQUESTS, batch_size=4, progress=calls.append)
    assert sum(calls) == len(REQUESTS) and len(calls) > 1


def test_requests_objects_and_errors(lm):
    model, tok = lm
    from hubmerge.evaluation.tasks.specs import Request

    objs = [Request(0, i, c, t) for i, (c, t) in enumerate(REQUESTS[:3])]
    assert score_requests(model, tok, objs) == score_requests(model, tok, REQUESTS[:3])
    with pytest.raises(TaskDataError, match="request 1: continuation '' encodes to no tokens"):
        score_requests(model, tok, [("The cat", " sat"), ("The cat", "")])
    with pytest.raises(TaskDataError, match="continuation ''"):
        score_requests(model, tok, [("", "")])


def test_load_model_roundtrip(lm, tmp_path):
    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(tmp_path / "m")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert score_requests(loaded, loaded_tok, REQUESTS[:4]) == score_requests(model, tok, REQUESTS[:4])
    with pytest.raises(SourceError, match="no config.json"):
        load_model(tmp_path / "missing")
    with pytest.raises(SourceError, match="not a torch dtype"):
        load_model(tmp_path / "m", dtype="float33")


def test_shared_context_runs_once(lm):
    """The four choices of a question share one row: the context once, then each continuation."""
    model, tok = lm
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        score_requests(model, tok, REQUESTS[:4])
        shared = shapes[-1]
        score_requests(model, tok, REQUESTS[:4], share_prefix=False)
        plain = shapes[-1]
    finally:
        hook.remove()
    pairs = encode_requests(tok, REQUESTS[:4])
    ctx = pairs[0][0]
    assert shared[0] == 1 and shared[1] <= len(ctx) + sum(len(cont) - 1 for _, cont in pairs)
    assert plain == (4, max(len(c) + len(t) - 1 for c, t in pairs))  # lm-eval's way: four full rows
    assert model.config._attn_implementation == "sdpa"  # packed rows ran eager, and it was put back


def test_minimal_pairs_share_their_common_words(lm):
    """BLiMP: empty contexts, so only the sentences' common first tokens can be shared."""
    model, tok = lm
    pair = REQUESTS[9:11]
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        got = score_requests(model, tok, pair)
    finally:
        hook.remove()
    pairs = encode_requests(tok, pair)
    (ctx, good), (_, bad) = pairs
    common = next(i for i, (a, b) in enumerate(zip(good, bad, strict=False)) if a != b)
    assert shapes[-1] == (1, len(ctx) + len(good) - 1 + len(bad) - 1 - common)
    _assert_close(got, [_reference(model, c, t) for c, t in pairs], [len(good), len(bad)])


@pytest.mark.parametrize(
    "api",
    [
        {"keep_kw": "logits_to_keep", "bool_keep": False, "can_pack": True},  # transformers 4.50 to 4.x
        {"keep_kw": None, "bool_keep": False, "can_pack": True},  # a model without logits_to_keep
        {"keep_kw": "logits_to_keep", "bool_keep": True, "can_pack": False},  # positions from the mask (ALiBi)
    ],
)
def test_fallbacks_give_the_same_numbers(lm, monkeypatch, api):
    model, tok = lm
    want = score_requests(model, tok, REQUESTS)
    monkeypatch.setattr(scoring, "_api", lambda model, device: scoring._Api(**api))
    got = score_requests(model, tok, REQUESTS)
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5) and g.is_greedy == w.is_greedy
