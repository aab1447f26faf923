"""A toy English grammar: the pretraining text and the BLiMP-style test of ``hubmerge demo``.

The demo must show, offline and in seconds, what the tool is for: downstream scores that wobble
from checkpoint to checkpoint. A tiny word-level model trained on this grammar learns its rules
at different times and with different reliability: number agreement between a reflexive and its
verb within a hundred steps, plain subject-verb agreement soon after, agreement across an
attractor noun (a PP or relative clause in between) only after a phase in which the model
agrees with the nearest noun and scores below chance, and reflexive gender later still. So the
per-paradigm scores of its checkpoints rise, dip and wander like those of a real trajectory.

Everything is pure Python and driven by seeded ``random.Random`` objects: the same seed gives
the same text on every machine. Words follow a Zipf-Mandelbrot law in the corpus, as in natural
text, and are drawn uniformly in the minimal pairs, as in BLiMP. Sentences are lower case with
space-separated words and a final " ." so that a whitespace word-level tokenizer covers them
exactly. Minimal pairs follow BLiMP's JSONL format and differ in exactly one word.

Test sentences are held out by a content hash: the corpus never contains a sentence whose CRC32
falls into the held-out bucket, and every ``sentence_good`` of the minimal pairs does. The model
therefore never saw a test sentence verbatim, whatever seeds the two sides use.
"""

from __future__ import annotations

import itertools
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hubmerge.errors import OutputError, RecipeError

# --- lexicon ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    sg: str
    pl: str
    kind: str  # "m"/"f": gendered person, "p": person of either gender, "a": animal, "t": thing

    def form(self, plural: bool) -> str:
        return self.pl if plural else self.sg


@dataclass(frozen=True)
class Verb:
    sg: str  # third person singular present: "runs"
    pl: str  # plural present: "run"

    def form(self, plural: bool) -> str:
        return self.pl if plural else self.sg


def _nouns(kind: str, pairs: str) -> list[Noun]:
    """Parse "sg/pl sg/pl ..." (or just "sg" for a regular -s plural) into nouns of one kind."""
    out = []
    for item in pairs.split():
        sg, _, pl = item.partition("/")
        out.append(Noun(sg, pl or sg + "s", kind))
    return out


def _words(text: str) -> list[str]:
    return text.split()


def _verbs(words: str) -> list[Verb]:
    """Parse "runs/run watches/watch ..." into verbs."""
    return [Verb(*item.split("/")) for item in words.split()]


MALE = _nouns(
    "m",
    "man/men boy king prince father brother son uncle husband nephew monk waiter actor "
    "gentleman/gentlemen wizard grandfather",
)
FEMALE = _nouns(
    "f",
    "woman/women girl queen princess/princesses mother sister daughter aunt wife/wives niece nun "
    "waitress/waitresses actress/actresses lady/ladies witch/witches grandmother",
)
PERSON = _nouns(
    "p",
    "teacher doctor student child/children farmer baker pilot singer friend neighbor dancer "
    "painter writer soldier nurse driver lawyer cook guest stranger",
)
ANIMAL = _nouns(
    "a",
    "dog cat bird horse wolf/wolves mouse/mice rabbit fox/foxes goose/geese goat bear frog snake duck lion",
)
THING = _nouns(
    "t",
    "ball book apple box/boxes car house tree cup chair table song letter picture door window "
    "bottle hat key/keys river/rivers road stone flower bench/benches coat lamp",
)


def _interleave(*groups: list[Noun]) -> list[Noun]:
    """Round-robin merge, so that frequency ranks (see ``_ZipfRandom``) mix the groups evenly."""
    out = []
    for i in range(max(map(len, groups))):
        out += [group[i] for group in groups if i < len(group)]
    return out


SUBJECTS = _interleave(MALE, FEMALE, PERSON, ANIMAL)
ALL_NOUNS = _interleave(MALE, FEMALE, PERSON, ANIMAL, THING)

INTRANSITIVE = _verbs(
    "runs/run sleeps/sleep sings/sing laughs/laugh smiles/smile waits/wait jumps/jump swims/swim "
    "cries/cry walks/walk dances/dance falls/fall rests/rest works/work shouts/shout"
)
TRANSITIVE = _verbs(
    "sees/see likes/like finds/find watches/watch knows/know loves/love hates/hate follows/follow "
    "visits/visit calls/call chases/chase remembers/remember hears/hear carries/carry wants/want"
)
# Transitive verbs that also take a reflexive object ("the king sees himself").
REFLEXIVE = _verbs(
    "sees/see likes/like helps/help hurts/hurt admires/admire blames/blame washes/wash trusts/trust praises/praise"
)
COPULA = _verbs("is/are was/were")
SAYS = _verbs("says/say thinks/think believes/believe")

ADJECTIVES = _words(
    "big small old young happy sad red green tall short quiet loud clever lazy hungry angry brave "
    "kind tired busy pretty strange little famous friendly poor rich nice calm proud"
)
PREPOSITIONS = _words("near behind with beside under above without from around inside")
DET_SG = ["the", "the", "the", "this", "that", "every", "each"]
DET_PL = ["the", "the", "the", "these", "those", "some", "many", "two", "three", "several"]
DEMONSTRATIVE = {False: ["this", "that"], True: ["these", "those"]}
OTHER_WORDS = ["that", ".", "he", "she", "it", "they"]
REFLEXIVES = ("himself", "herself", "itself", "themselves")
POSSESSIVES = ("his", "her", "its", "their")

ZIPF_EXPONENT = 1.0
ZIPF_OFFSET = 3  # Zipf-Mandelbrot: flattens the head, so the rarest noun is ~30x rarer than the first
HELD_OUT_BUCKETS = 8  # one sentence in eight (by CRC32) is reserved for the minimal pairs


class _ZipfRandom(random.Random):
    """A ``Random`` whose ``choice`` prefers early items: item k with weight 1/(k + ZIPF_OFFSET).

    Natural text is Zipfian: a few words are frequent, most are rare. A model learns the agreement
    of frequent nouns and verbs early and of rare ones late and unreliably, which is what makes
    its checkpoint-to-checkpoint scores wobble. Only the corpus uses it; the minimal pairs draw
    every word uniformly, as BLiMP does, so rare words count as much as frequent ones.
    """

    _cum_weights: dict[int, list[float]] = {}

    def choice(self, seq):
        n = len(seq)
        if n not in self._cum_weights:
            self._cum_weights[n] = list(
                itertools.accumulate(1.0 / (rank + ZIPF_OFFSET) ** ZIPF_EXPONENT for rank in range(n))
            )
        return self.choices(seq, cum_weights=self._cum_weights[n])[0]


def _is_held_out(sentence: str) -> bool:
    return zlib.crc32(sentence.encode()) % HELD_OUT_BUCKETS == 0


def _pronoun(noun: Noun, plural: bool, rng: random.Random, forms: tuple = ("he", "she", "it", "they")) -> str:
    """The pronoun for ``noun``; a person of unknown gender ("the teacher") gets he or she."""
    he, she, it, they = forms
    if plural:
        return they
    if noun.kind == "a":
        return it
    if noun.kind == "p":
        return he if rng.random() < 0.5 else she  # not choice(): _ZipfRandom would favour "he"
    return he if noun.kind == "m" else she


def _reflexive(noun: Noun, plural: bool, rng: random.Random) -> str:
    return _pronoun(noun, plural, rng, REFLEXIVES)


# --- the grammar -----------------------------------------------------------------------------

Words = list[str]


class Grammar:
    """A seeded sentence generator; ``seed`` makes the corpus and the minimal pairs reproducible.

    The corpus and the minimal pairs draw from separate random streams, so asking for more
    sentences never changes the pairs, and vice versa.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # -- phrases: each returns its words; the callers keep track of where the agreement lies --

    def _np(self, rng: random.Random, plural: bool, nouns: list[Noun], adj_p: float = 0.3) -> Words:
        det = rng.choice(DET_PL if plural else DET_SG)
        adj = [rng.choice(ADJECTIVES)] if rng.random() < adj_p else []
        return [det, *adj, rng.choice(nouns).form(plural)]

    def _pp(self, rng: random.Random, plural: bool | None = None) -> Words:
        plural = rng.random() < 0.5 if plural is None else plural
        return [rng.choice(PREPOSITIONS), *self._np(rng, plural, ALL_NOUNS, adj_p=0.2)]

    def _rc(self, rng: random.Random, head_plural: bool, inner_plural: bool | None = None) -> Words:
        """A subject relative clause whose verb agrees with the head: "that chases the cats"."""
        inner_plural = rng.random() < 0.5 if inner_plural is None else inner_plural
        verb = rng.choice(TRANSITIVE).form(head_plural)
        return ["that", verb, *self._np(rng, inner_plural, ALL_NOUNS, adj_p=0.2)]

    def _object_rc(self, rng: random.Random, plural: bool | None = None) -> Words:
        """An object relative clause, its verb agreeing with its own subject: "that the cats chase"."""
        plural = rng.random() < 0.5 if plural is None else plural
        return ["that", *self._np(rng, plural, SUBJECTS, adj_p=0.2), rng.choice(TRANSITIVE).form(plural)]

    def _vp(self, rng: random.Random, noun: Noun, plural: bool) -> Words:
        """A verb phrase agreeing with ``noun``; the finite verb is always its first word."""
        r = rng.random()
        if r < 0.25:
            verb = [rng.choice(INTRANSITIVE).form(plural)]
            return verb + (self._pp(rng) if rng.random() < 0.25 else [])
        if r < 0.60:
            obj = self._np(rng, rng.random() < 0.5, ALL_NOUNS)
            if rng.random() < 0.3:  # a possessive bound to the subject: "the queen sees her dog"
                obj[0] = _pronoun(noun, plural, rng, POSSESSIVES)
            return [rng.choice(TRANSITIVE).form(plural), *obj]
        if r < 0.75:
            return [rng.choice(COPULA).form(plural), rng.choice(ADJECTIVES)]
        return [rng.choice(REFLEXIVE).form(plural), _reflexive(noun, plural, rng)]

    def _clause(self, rng: random.Random) -> tuple[Words, Noun, bool]:
        """A clause and its subject's head noun and number (for a pronoun that refers back)."""
        plural = rng.random() < 0.5
        noun = rng.choice(SUBJECTS)
        np = self._np(rng, plural, [noun])
        r = rng.random()
        if r < 0.20:
            np += self._pp(rng)
        elif r < 0.30:
            np += self._rc(rng, plural)
        elif r < 0.35:
            np += self._object_rc(rng)
        return np + self._vp(rng, noun, plural), noun, plural

    def sentence(self, rng: random.Random) -> str:
        """One grammatical sentence (never a held-out one).

        About one in seven embeds a clause under "says that"; half of those start the embedded clause
        with a pronoun for the outer subject ("the queens say that they run"), which gives gender
        and number a second, agreement-bearing use beside the reflexives.
        """
        while True:
            words, noun, plural = self._clause(rng)
            if rng.random() < 0.15:
                if rng.random() < 0.5:  # the outer subject is the pronoun's antecedent
                    words = [_pronoun(noun, plural, rng), *self._vp(rng, noun, plural)]
                else:
                    plural, noun = rng.random() < 0.5, rng.choice(SUBJECTS)
                says = rng.choice(SAYS).form(plural)
                words = [*self._np(rng, plural, [noun]), says, "that", *words]
            text = " ".join([*words, "."])
            if not _is_held_out(text):
                return text

    def generate_corpus(self, n_sentences: int) -> list[str]:
        """``n_sentences`` training sentences, the same ones for the same seed."""
        rng = _ZipfRandom(f"hubmerge-corpus-{self.seed}")
        return [self.sentence(rng) for _ in range(n_sentences)]

    # -- minimal pairs: each paradigm returns (good words, index of the word to corrupt, bad word) --

    def _subject_verb(self, rng: random.Random) -> tuple[Words, int, str]:
        plural = rng.random() < 0.5
        subj = self._np(rng, plural, SUBJECTS)
        verb = rng.choice(INTRANSITIVE + TRANSITIVE + COPULA)
        rest = self._np(rng, rng.random() < 0.5, ALL_NOUNS) if verb in TRANSITIVE else []
        rest = [rng.choice(ADJECTIVES)] if verb in COPULA else rest
        return [*subj, verb.form(plural), *rest], len(subj), verb.form(not plural)

    def _across_pp(self, rng: random.Random) -> tuple[Words, int, str]:
        plural = rng.random() < 0.5
        subj = self._np(rng, plural, SUBJECTS) + self._pp(rng, plural=not plural)
        verb = rng.choice(INTRANSITIVE + COPULA)
        rest = [rng.choice(ADJECTIVES)] if verb in COPULA else []
        return [*subj, verb.form(plural), *rest], len(subj), verb.form(not plural)

    def _across_rc(self, rng: random.Random) -> tuple[Words, int, str]:
        plural = rng.random() < 0.5
        subj = self._np(rng, plural, SUBJECTS, adj_p=0.0) + self._rc(rng, plural, inner_plural=not plural)
        verb = rng.choice(INTRANSITIVE + COPULA)
        rest = [rng.choice(ADJECTIVES)] if verb in COPULA else []
        return [*subj, verb.form(plural), *rest], len(subj), verb.form(not plural)

    def _across_object_rc(self, rng: random.Random) -> tuple[Words, int, str]:
        plural = rng.random() < 0.5
        subj = self._np(rng, plural, SUBJECTS, adj_p=0.0) + self._object_rc(rng, plural=not plural)
        verb = rng.choice(INTRANSITIVE + COPULA)
        rest = [rng.choice(ADJECTIVES)] if verb in COPULA else []
        return [*subj, verb.form(plural), *rest], len(subj), verb.form(not plural)

    def _determiner_noun(self, rng: random.Random) -> tuple[Words, int, str]:
        subj_plural, plural = rng.random() < 0.5, rng.random() < 0.5
        subj = self._np(rng, subj_plural, SUBJECTS)
        verb = rng.choice(TRANSITIVE).form(subj_plural)
        noun = rng.choice(ALL_NOUNS)
        adj = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        words = [*subj, verb, rng.choice(DEMONSTRATIVE[plural]), *adj, noun.form(plural)]
        return words, len(words) - 1, noun.form(not plural)

    def _anaphor_gender(self, rng: random.Random) -> tuple[Words, int, str]:
        noun = rng.choice(rng.choice([MALE, FEMALE]))  # balanced, so that a gender bias scores 0.5
        subj = self._np(rng, False, [noun])
        good, bad = ("himself", "herself") if noun.kind == "m" else ("herself", "himself")
        words = [*subj, rng.choice(REFLEXIVE).sg, good]
        return words, len(words) - 1, bad

    def _anaphor_number(self, rng: random.Random) -> tuple[Words, int, str]:
        plural = rng.random() < 0.5
        noun = rng.choice(MALE + FEMALE)
        subj = self._np(rng, plural, [noun])
        sg = "himself" if noun.kind == "m" else "herself"
        good, bad = ("themselves", sg) if plural else (sg, "themselves")
        words = [*subj, rng.choice(REFLEXIVE).form(plural), good]
        return words, len(words) - 1, bad

    def paradigms(self) -> dict[str, tuple[str, Callable[[random.Random], tuple[Words, int, str]]]]:
        """BLiMP-style UID -> (linguistics_term, generator)."""
        return {
            "subject_verb_agreement": ("subject_verb_agreement", self._subject_verb),
            "agreement_across_pp": ("subject_verb_agreement", self._across_pp),
            "agreement_across_relative_clause": ("subject_verb_agreement", self._across_rc),
            "agreement_across_object_relative_clause": ("subject_verb_agreement", self._across_object_rc),
            "determiner_noun_agreement": ("determiner_noun_agreement", self._determiner_noun),
            "anaphor_gender_agreement": ("anaphor_agreement", self._anaphor_gender),
            "anaphor_number_agreement": ("anaphor_agreement", self._anaphor_number),
        }

    def minimal_pairs(self, n_per_paradigm: int = 100, paradigms: list[str] | None = None) -> list[dict]:
        """BLiMP-format pairs whose good sentences are held out of every corpus; no duplicates."""
        table = self.paradigms()
        unknown = sorted(set(paradigms or []) - set(table))
        if unknown:
            raise RecipeError(f"unknown grammar paradigm(s) {unknown}; choose from {sorted(table)}")
        pairs = []
        for uid in paradigms or list(table):
            term, make = table[uid]
            rng = random.Random(f"hubmerge-pairs-{self.seed}-{uid}")
            seen: set[str] = set()
            for _ in range(n_per_paradigm * 2000):
                if len(seen) == n_per_paradigm:
                    break
                words, index, bad_word = make(rng)
                good = " ".join([*words, "."])
                if good in seen or not _is_held_out(good):
                    continue
                seen.add(good)
                bad = " ".join([*words[:index], bad_word, *words[index + 1 :], "."])
                pairs.append(
                    {
                        "sentence_good": good,
                        "sentence_bad": bad,
                        "field": "morphology",
                        "linguistics_term": term,
                        "UID": uid,
                        "pairID": str(len(seen) - 1),
                    }
                )
            if len(seen) < n_per_paradigm:  # pragma: no cover - the lexicon is far larger than this
                raise RecipeError(f"paradigm {uid} has fewer than {n_per_paradigm} distinct held-out pairs")
        return pairs

    def write_minimal_pairs(self, path: Path, n_per_paradigm: int = 100) -> Path:
        """Write the pairs as one JSONL file (all paradigms, told apart by ``UID``)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                for pair in self.minimal_pairs(n_per_paradigm):
                    f.write(json.dumps(pair) + "\n")
        except OSError as err:
            raise OutputError(f"cannot write minimal pairs to {path}: {err}; choose a writable path") from err
        return path

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word the grammar can produce, sorted; a word-level tokenizer needs nothing else."""
        words = set(ADJECTIVES + PREPOSITIONS + DET_SG + DET_PL + OTHER_WORDS)
        words |= set(REFLEXIVES + POSSESSIVES)
        for noun in ALL_NOUNS:
            words |= {noun.sg, noun.pl}
        for verb in INTRANSITIVE + TRANSITIVE + REFLEXIVE + COPULA + SAYS:
            words |= {verb.sg, verb.pl}
        return sorted(words)


# --- module-level shortcuts for the CLI --------------------------------------------------------


def generate_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    return Grammar(seed).generate_corpus(n_sentences)


def minimal_pairs(n_per_paradigm: int = 100, seed: int = 0) -> list[dict]:
    return Grammar(seed).minimal_pairs(n_per_paradigm)


def write_minimal_pairs(path: Path, n_per_paradigm: int = 100, seed: int = 0) -> Path:
    return Grammar(seed).write_minimal_pairs(path, n_per_paradigm)


def vocabulary() -> list[str]:
    return Grammar.vocabulary()
