"""The demo's toy grammar and its tiny-model trainer.

The grammar tests check what the demo's numbers rest on: every corpus sentence is grammatical
(agreement holds), every minimal pair differs only in the agreement word, and test sentences
never occur in the training text. The trainer tests use a model of a few thousand parameters
and a handful of steps, so they take seconds; the demo-sized run that shows the model beating
chance is opt-in (HUBMERGE_SLOW_TESTS=1), since it takes 15-40 s on two cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hubmerge.demo import grammar as g
from hubmerge.demo.grammar import Grammar, generate_corpus, minimal_pairs, vocabulary, write_minimal_pairs
from hubmerge.errors import OutputError, RecipeError, SourceError

BLIMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"

NOUN_NUMBER = {n.sg: False for n in g.ALL_NOUNS} | {n.pl: True for n in g.ALL_NOUNS}
NOUNS = {form: n for n in g.ALL_NOUNS for form in (n.sg, n.pl)}
VERB_NUMBER = {
    form: plural
    for v in g.INTRANSITIVE + g.TRANSITIVE + g.REFLEXIVE + g.COPULA + g.SAYS
    for form, plural in ((v.sg, False), (v.pl, True))
}
DET_NUMBER = {"this": False, "every": False, "each": False} | dict.fromkeys(
    ["these", "those", "some", "many", "two", "three", "several"], True
)


def simple_clause(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(noun, verb, rest) when ``words`` is "det [adj] noun verb rest", else None."""
    i = 2 if words[1] in g.ADJECTIVES else 1
    if len(words) > i + 1 and words[i] in NOUNS and words[i + 1] in VERB_NUMBER:
        return words[i], words[i + 1], words[i + 2 :]
    return None


def check_grammatical(sentence: str) -> None:
    """Assert the agreements a sentence can be checked for without a parser."""
    words = sentence.split()
    assert words[-1] == "." and "." not in words[:-1]
    assert set(words) <= set(vocabulary()), sentence
    for det, nxt, nxt2 in zip(words, words[1:], words[2:], strict=False):
        if det in DET_NUMBER:  # determiner-noun agreement, anywhere in the sentence
            noun = nxt2 if nxt in g.ADJECTIVES else nxt
            assert NOUN_NUMBER[noun] == DET_NUMBER[det], sentence
    clause = simple_clause(words)
    if clause:  # subject-verb agreement, and a reflexive object agrees with the subject
        noun, verb, rest = clause
        assert VERB_NUMBER[verb] == NOUN_NUMBER[noun], sentence
        if rest[0] in g.REFLEXIVES:
            kind, plural = NOUNS[noun].kind, NOUN_NUMBER[noun]
            allowed = (
                {"themselves"}
                if plural
                else {"m": {"himself"}, "f": {"herself"}, "a": {"itself"}}.get(kind, {"himself", "herself"})
            )
            assert rest[0] in allowed, sentence


# --- grammar ---------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_seeded():
    assert generate_corpus(300, seed=1) == generate_corpus(300, seed=1)
    assert generate_corpus(300, seed=1) != generate_corpus(300, seed=2)
    # A longer corpus extends a shorter one: the demo's size never changes its first sentences.
    assert generate_corpus(500, seed=1)[:300] == generate_corpus(300, seed=1)


def test_corpus_sentences_are_grammatical_and_varied():
    corpus = generate_corpus(3000, seed=0)
    checked = 0
    for sentence in corpus:
        check_grammatical(sentence)
        checked += simple_clause(sentence.split()) is not None
    assert checked > 1000  # the agreement check did run on a good share of the corpus
    words = {w for s in corpus for w in s.split()}
    assert len(words) > 0.9 * len(vocabulary())
    assert 200 <= len(vocabulary()) <= 500
    assert any(" near " in s or " behind " in s for s in corpus)  # attractor PPs
    assert any(" that " in s for s in corpus)  # relative clauses / complement clauses
    assert {"himself", "herself", "themselves"} <= words


def test_minimal_pairs_format_and_agreement():
    pairs = minimal_pairs(40, seed=0)
    uids = [p["UID"] for p in pairs]
    assert sorted(set(uids)) == sorted(Grammar(0).paradigms())
    assert all(uids.count(u) == 40 for u in set(uids))
    for p in pairs:
        assert set(p) == {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID"}
        assert isinstance(p["pairID"], str)
        good, bad = p["sentence_good"].split(), p["sentence_bad"].split()
        assert len(good) == len(bad)
        diff = [i for i, (a, b) in enumerate(zip(good, bad, strict=True)) if a != b]
        assert len(diff) == 1, p  # exactly the agreement word differs
        a, b = good[diff[0]], bad[diff[0]]
        if p["linguistics_term"] == "subject_verb_agreement":
            assert VERB_NUMBER[a] != VERB_NUMBER[b]
        elif p["linguistics_term"] == "determiner_noun_agreement":
            assert NOUNS[a] == NOUNS[b] and NOUN_NUMBER[a] != NOUN_NUMBER[b]
        else:
            assert {a, b} <= set(g.REFLEXIVES)
        check_grammatical(p["sentence_good"])
    assert len({(p["UID"], p["pairID"]) for p in pairs}) == len(pairs)
    assert len({(p["UID"], p["sentence_good"]) for p in pairs}) == len(pairs)  # no repeats in a paradigm


def test_minimal_pairs_are_held_out_of_the_corpus():
    pairs = minimal_pairs(50, seed=0)
    corpus = set(generate_corpus(20000, seed=0))
    assert not corpus & {p["sentence_good"] for p in pairs}
    assert not corpus & {p["sentence_bad"] for p in pairs}


def test_minimal_pairs_are_deterministic_and_independent_of_the_count():
    assert minimal_pairs(20, seed=3) == minimal_pairs(20, seed=3)
    assert minimal_pairs(20, seed=3) != minimal_pairs(20, seed=4)
    first = [p for p in minimal_pairs(30, seed=3) if int(p["pairID"]) < 20]
    assert first == minimal_pairs(20, seed=3)


def test_unknown_paradigm_is_a_recipe_error():
    with pytest.raises(RecipeError, match="agreement_typo"):
        Grammar(0).minimal_pairs(5, paradigms=["agreement_typo"])


def test_write_minimal_pairs_matches_blimp_jsonl(tmp_path):
    path = write_minimal_pairs(tmp_path / "sub" / "pairs.jsonl", n_per_paradigm=3, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == minimal_pairs(3, seed=0)
    real = sorted(BLIMP.glob("*.jsonl"))
    if not real:
        pytest.skip("../shared/data/blimp is not present")
    blimp_row = json.loads(real[0].read_text().splitlines()[0])
    for key, value in rows[0].items():  # same field names and types as real BLiMP
        assert type(blimp_row[key]) is type(value), key


# --- tokenizer and training ------------------------------------------------------------------

from hubmerge.demo import train  # noqa: E402

TINY = dict(d_model=16, n_layers=1, n_heads=2, seq_len=16, batch_size=4)


def test_word_tokenizer_covers_the_grammar():
    tok = train.build_tokenizer(generate_corpus(200) + [" ".join(vocabulary())], kind="word")
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert len(tok) == len(vocabulary()) + 4
    ids = tok("the dog near the cats runs .", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "the dog near the cats runs ."
    assert tok("the zebra runs .", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id


def test_bpe_tokenizer_for_open_text():
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"] * 20
    tok = train.build_tokenizer(texts, kind="bpe", vocab_size=300)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    ids = tok("Zebras quickly jump.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Zebras quickly jump."  # byte-level: nothing is unknown
    with pytest.raises(RecipeError, match="tokenizer kind"):
        train.build_tokenizer(texts, kind="char")


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_short_run_is_loadable_and_bit_identical(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    kwargs = dict(steps=6, save_every=3, seed=7, **TINY)
    first = train.train_trajectory(tmp_path / "a", progress=lambda *a: calls.append(a), **kwargs)
    train.train_trajectory(tmp_path / "b", **kwargs)

    assert [p.name for p in first] == ["step3", "step6"]
    assert [c[:2] for c in calls] == [(s, 6) for s in range(1, 7)]
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")  # weights, tokenizer, trajectory.json
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (first[-1] / name).is_file()

    record = json.loads((tmp_path / "a" / "trajectory.json").read_text())
    assert record["steps"] == [3, 6] and record["checkpoints"] == ["step3", "step6"]
    assert len(record["losses"]) == 2 and len(record["step_losses"]) == 6
    assert record["seed"] == 7 and record["config"]["arch"] == "llama"

    model = AutoModelForCausalLM.from_pretrained(first[-1])
    tok = AutoTokenizer.from_pretrained(first[-1])
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert model.config.vocab_size == len(tok) and model.config.bos_token_id == tok.bos_token_id

    third = train.train_trajectory(tmp_path / "c", **(kwargs | {"seed": 8}))
    assert _digests(third[-1])["model.safetensors"] != _digests(first[-1])["model.safetensors"]


def test_gpt_neox_run_from_a_corpus(tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = ["the dog runs .", "the dogs run ."] * 100
    (step,) = train.train_trajectory(tmp_path, steps=2, save_every=2, arch="gpt_neox", corpus=corpus, **TINY)
    model = AutoModelForCausalLM.from_pretrained(step)
    assert model.config.model_type == "gpt_neox" and not model.config.tie_word_embeddings
    assert model.config.vocab_size == 4 + 6  # the specials and the corpus's own words


def test_run_from_a_text_file_uses_bpe(tmp_path):
    from transformers import AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(300)))
    (step,) = train.train_trajectory(tmp_path / "out", steps=1, save_every=1, text_file=text, vocab_size=300, **TINY)
    tok = AutoTokenizer.from_pretrained(step)
    assert len(tok) == 300 and tok.decode(tok("Zebras!")["input_ids"]) == "Zebras!"
    record = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    assert record["config"]["tokenizer"] == "bpe" and record["config"]["corpus"] == str(text)
    with pytest.raises(SourceError, match="missing.txt"):
        train.train_trajectory(tmp_path / "x", text_file=tmp_path / "missing.txt", **TINY)


def test_refuses_to_mix_runs_unless_forced(tmp_path):
    kwargs = dict(steps=2, save_every=1, corpus=["the dog runs ."] * 200, **TINY)
    train.train_trajectory(tmp_path, **kwargs)
    with pytest.raises(OutputError, match="already holds a trajectory"):
        train.train_trajectory(tmp_path, **kwargs)
    steps = train.train_trajectory(tmp_path, force=True, **(kwargs | {"save_every": 2}))
    assert sorted(p.name for p in tmp_path.glob("step*")) == [p.name for p in steps] == ["step2"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "mamba"}, "architecture"),
        ({"schedule": "linear"}, "schedule"),
        ({"d_model": 10, "n_heads": 4}, "multiple"),
        ({"corpus": ["a ."], "text_file": Path("x.txt")}, "either"),
        ({"steps": 0}, ">= 1"),
    ],
)
def test_invalid_settings_are_recipe_errors(tmp_path, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        train.train_trajectory(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
