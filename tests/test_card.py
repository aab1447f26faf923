"""The stability model card: front matter the client and the Hub accept, provenance, evidence from the store."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from factories import save_trajectory, write_recipe
from huggingface_hub import ModelCard

from hubmerge.hub.client import HubClient
from hubmerge.io.files import sha256_file
from hubmerge.stability.card import CardEvidence, evidence_from_store, source_labels
from hubmerge.workflows.card import build_card, write_card
from hubmerge.workflows.merge import merge_recipe

pytest.importorskip("duckdb")

TAGS = ["merge", "checkpoint-averaging", "hubmerge"]
REPO = "org/tiny-traj"


def tiny_png(path: Path) -> Path:
    """A valid 1x1 PNG, so the plot is a real image without drawing one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def merged(tmp_path):
    """A weighted merge of three local checkpoints; the newest carries a licence in its README."""
    ckpts = save_trajectory(tmp_path / "ckpts", 3)
    (ckpts[-1] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# step300\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", ckpts, tmp_path / "out", method="weighted", weights=[0.2, 0.3, 0.5])
    with recipe.open("a") as f:
        f.write("# a comment the card keeps verbatim\n")
    merge_recipe(recipe)
    return SimpleNamespace(out=tmp_path / "out", recipe=recipe, ckpts=ckpts)


def hand_evidence(plot: Path | None = None) -> CardEvidence:
    return CardEvidence(
        scores={
            "toy_mc": {"merged": 0.75, "step100": 0.5, "step200": 0.5, "step300": 1.0},
            "toy_pairs": {"merged": 0.625, "step100": 0.5, "step200": 0.75, "step300": 0.5},
        },
        metric={"toy_mc": "acc_norm", "toy_pairs": "acc"},
        ensemble={"toy_mc": 0.75, "toy_pairs": 0.625},
        stability={
            "toy_mc": {"mtv_before": 0.25, "is_before": 0.5, "flip_before": 0.5, "mtv_after": 0.0},
            "toy_pairs": {"mtv_before": 0.25, "is_before": None, "flip_before": 0.375, "mtv_after": 0.125},
        },
        plot=plot,
        n_examples={"toy_mc": 4, "toy_pairs": 8},
        task_sources={"toy_mc": "toy_mc.jsonl", "toy_pairs": "hf:org/pairs:test"},
    )


def check_files_match(folder: Path) -> None:
    """hubmerge.json lists every file of the folder, each with its current sha256."""
    prov = json.loads((folder / "hubmerge.json").read_text())
    present = {p.name for p in folder.iterdir() if p.is_file()} - {"hubmerge.json"}
    assert set(prov["files"]) == present
    assert all(sha256_file(folder / name) == digest for name, digest in prov["files"].items())


def test_card_round_trips_and_shows_the_merge(merged, tmp_path):
    evidence = hand_evidence(tiny_png(tmp_path / "plot.png"))
    readme = write_card(merged.out, evidence, command="hubmerge eval . --tasks toy_mc,toy_pairs")
    assert readme == merged.out / "README.md"

    card = ModelCard.load(readme)
    data = card.data
    assert data.tags == TAGS and data.library_name == "transformers"
    assert data.license == "apache-2.0"  # from the newest source's README
    assert data.base_model is None  # local sources: no Hub repo to point at
    assert data.model_name == "test-merge"
    # model-index names a dataset by its Hub id: only toy_pairs (hf:org/pairs:test) is one; toy_mc's local file
    # is named in the body with its sha256 instead
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {("toy_pairs", "acc"): 0.625}
    (result,) = data.eval_results
    assert result.task_type == "text-generation" and result.dataset_type == "org/pairs"
    assert result.dataset_split == "test"

    text = readme.read_text()
    # the published recipe: the user's text with its local paths made relative (comment kept), output a new folder
    recipe_text = merged.recipe.read_text().replace(str(merged.ckpts[0].parent), "../ckpts")
    recipe_text = recipe_text.replace(str(merged.out), "out")
    assert "# a comment the card keeps verbatim" in recipe_text and str(merged.out.parent) not in recipe_text
    assert recipe_text in text
    assert (merged.out / "recipe.yaml").read_text() == recipe_text
    prov = json.loads((merged.out / "hubmerge.json").read_text())
    for label, src in zip(source_labels(prov), prov["sources"], strict=True):
        assert f"| {label} | ../ckpts/{label} | — (local folder) | {src['weight']:.6g} |" in text
    assert "hubmerge merge recipe.yaml" in text and "hubmerge eval . --tasks toy_mc,toy_pairs" in text
    assert "| **merged (this model)** | 0.7500 | 0.6250 |" in text
    assert "| ensemble of the 3 sources (probability averaging) | 0.7500 | 0.6250 |" in text
    assert "| toy_mc | acc_norm | 0.2500 | 0.0000 | 0.5000 | 0.5000 |" in text  # MTV before/after, IS, flip
    assert "| toy_pairs | acc | 0.2500 | 0.1250 | — | 0.3750 |" in text
    assert "![Scores and instability along the trajectory](stability.png)" in text
    assert (merged.out / "stability.png").read_bytes() == evidence.plot.read_bytes()
    assert "arXiv:2510.04848" in text and str(Path.home()) + "/" not in text
    for name, digest in prov["files"].items():
        if name.endswith(".safetensors"):
            assert f"| {name} | `{digest}` |" in text
    check_files_match(merged.out)


def test_same_inputs_same_bytes(merged, tmp_path):
    evidence = hand_evidence(tiny_png(tmp_path / "plot.png"))
    readme = write_card(merged.out, evidence)
    first = {p.name: p.read_bytes() for p in merged.out.iterdir()}
    write_card(merged.out, evidence)
    assert {p.name: p.read_bytes() for p in merged.out.iterdir()} == first
    assert build_card(merged.out, evidence).content.encode() == readme.read_bytes()
    assert not [p for p in merged.out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_card_without_evidence_still_documents_the_merge(merged):
    readme = write_card(merged.out)
    card = ModelCard.load(readme)
    assert card.data.eval_results is None and card.data.tags == TAGS
    assert "## Evaluation" not in card.text and "## Stability" not in card.text
    assert "hubmerge merge recipe.yaml" in card.text
    check_files_match(merged.out)


# ------------------------------------------------------------------------------------------------ the store


def make_task(name: str, kind: str, choices: list[list[str]], gold: list[int], source: str | None = None):
    """A duck-typed tasks.TaskData with what the store reads."""
    examples = []
    for doc_id, (ch, g) in enumerate(zip(choices, gold, strict=True)):
        requests = tuple(
            SimpleNamespace(doc_id=doc_id, choice=c, context="Q:", continuation=" " + ch[c]) for c in range(len(ch))
        )
        examples.append(SimpleNamespace(doc_id=doc_id, gold=g, choices=tuple(ch), requests=requests, text=None))
    digest = hashlib.sha256(json.dumps([name, choices, gold]).encode()).hexdigest()
    return SimpleNamespace(
        spec=SimpleNamespace(name=name, kind=kind),
        examples=examples,
        data_hash=digest,
        source=source or f"{name}.jsonl",
    )


GOLD = [0, 1, 0, 1]
# predicted choice per example; the store derives predictions from log-likelihoods, so each model's predicted
# choice gets log-likelihood -0.1 and the other -2.0 (equally confident members: the ensemble is a majority vote)
PREDS = {
    "step100": [0, 0, 0, 0],  # correct 1 0 1 0: acc 0.5
    "step200": [0, 1, 1, 0],  # correct 1 1 0 0: acc 0.5
    "step300": [0, 1, 0, 1],  # correct 1 1 1 1: acc 1.0
    "merged": [0, 1, 0, 0],  # correct 1 1 1 0: acc 0.75
    "avg-a": [0, 1, 0, 0],
    "avg-b": [0, 1, 0, 1],  # the averaged series: acc 0.75 then 1.0
}


def loglik_rows(key: str, tkey: str, preds: list[int]) -> list[tuple]:
    return [(key, tkey, d, c, -0.1 if c == p else -2.0, c == p, 1) for d, p in enumerate(preds) for c in range(2)]


@pytest.fixture
def store(tmp_path, merged):
    from hubmerge.results.keys import weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    store = ResultsStore(tmp_path / "results")
    tkey = store.register_task(make_task("toy_mc", "multiple_choice", [["a", "b"]] * 4, GOLD))
    folders = {p.name: p for p in merged.ckpts} | {"merged": merged.out}
    for name, preds in PREDS.items():
        if name in folders:
            hashes = weight_hashes_of_folder(folders[name])
        else:
            hashes = [hashlib.sha256(name.encode()).hexdigest()]
        key = store.register_model(hashes, name=name, path=folders.get(name))
        store.add_logliks(loglik_rows(key, tkey, preds))
    return store


def test_evidence_from_the_store_matches_hand_computed_values(merged, store):
    ev = evidence_from_store(merged.out, store)
    assert ev.scores == {"toy_mc": {"merged": 0.75, "step100": 0.5, "step200": 0.5, "step300": 1.0}}
    assert ev.metric == {"toy_mc": "acc"} and ev.n_examples == {"toy_mc": 4}
    assert ev.task_sources == {"toy_mc": "toy_mc.jsonl"}
    # example 3: step100 and step200 say 0, step300 says 1 (gold): the vote is wrong, the others right
    assert ev.ensemble == {"toy_mc": 0.75}
    s = ev.stability["toy_mc"]
    assert s["mtv_before"] == pytest.approx(0.25)  # (|0.5 - 0.5| + |1.0 - 0.5|) / 2
    assert s["is_before"] == pytest.approx(0.5)  # answers change at examples 1, 2 then 2, 3
    assert s["flip_before"] == pytest.approx(0.5)  # correctness flips at examples 1, 2 then 2, 3
    assert s["is_vs_newest"] == pytest.approx(0.25) and s["flip_vs_newest"] == pytest.approx(0.25)  # example 3
    assert s["window_mean"] == pytest.approx(2 / 3) and s["window_range"] == pytest.approx(0.5)
    assert s["window_std"] == pytest.approx(math.sqrt(1 / 18)) and s["merged_minus_mean"] == pytest.approx(0.75 - 2 / 3)
    assert "mtv_after" not in s  # one merge is not a trajectory

    readme = write_card(merged.out, ev)
    text = readme.read_text()
    assert "MTV after" not in text and "No *after* column" in text
    stored = {s.task: s.acc for s in store.scores(models=[ev_key(merged.out)])}
    card = ModelCard.load(readme)
    assert stored == {"toy_mc": 0.75}
    assert card.data.eval_results is None  # toy_mc.jsonl is not a Hub dataset: no model-index entry claims one
    assert "data: the local file `toy_mc.jsonl`" in text and "not a Hub dataset" in text
    # the score with its standard error: correct 1 1 1 0, sqrt(var(ddof=1) / n) = sqrt(0.25 / 4)
    assert "| **merged (this model)** | 0.7500 ± 0.2500 |" in text
    assert ev.stderr["toy_mc"]["merged"] == pytest.approx(0.25)
    assert ev.stderr["toy_mc"]["step300"] == 0.0
    lo, hi = ev.intervals["toy_mc"]["flip_before"]
    assert lo <= s["flip_before"] <= hi
    assert f"0.5000 [{lo:.4f}, {hi:.4f}]" in text
    check_files_match(merged.out)


def ev_key(folder: Path) -> str:
    from hubmerge.results.keys import model_key, weight_hashes_of_folder

    return model_key(weight_hashes_of_folder(folder))


def test_stability_after_along_an_averaged_series(merged, store):
    ev = evidence_from_store(merged.out, store, ["toy_mc"], metric="acc_norm", averaged=["avg-a", "avg-b"])
    s = ev.stability["toy_mc"]
    assert s["mtv_after"] == pytest.approx(0.25)  # 0.75 -> 1.0
    assert s["is_after"] == pytest.approx(0.25) and s["flip_after"] == pytest.approx(0.25)  # example 3
    assert ev.metric == {"toy_mc": "acc_norm"}
    text = build_card(merged.out, ev).text
    bare = re.sub(r" \[[0-9.]+, [0-9.]+\]", "", text)  # the values without their bootstrap intervals
    assert "| toy_mc | acc_norm | 0.2500 | 0.2500 | 0.5000 | 0.2500 | 0.5000 | 0.2500 |" in bare
    assert set(ev.intervals["toy_mc"]) == {
        "mtv_before",
        "is_before",
        "flip_before",
        "mtv_after",
        "is_after",
        "flip_after",
    }
    assert "2 windowed weight averages" in text


def test_merged_model_missing_from_the_store_says_what_to_do(merged, tmp_path):
    from hubmerge.errors import StoreError
    from hubmerge.results.store import ResultsStore

    with pytest.raises(StoreError, match="evaluate it first"):
        evidence_from_store(merged.out, ResultsStore(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------ the Hub


def validate_yaml(hub, content: str) -> dict:
    req = urllib.request.Request(
        f"{hub.url}/api/validate-yaml",
        data=json.dumps({"content": content, "repoType": "model"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_card_of_a_hub_merge_validates_on_the_local_hub(tmp_path, hub, hub_api):
    from hubmerge.results.keys import weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    folders = save_trajectory(tmp_path / "ckpts", 2)
    hub_api.create_repo(REPO)
    for name, folder in zip(("step1000", "step2000"), folders, strict=True):
        hub_api.create_branch(REPO, branch=name)
        hub_api.upload_folder(repo_id=REPO, folder_path=folder, revision=name, delete_patterns="*")
    recipe = tmp_path / "hub.yaml"
    sources = {"repo": REPO, "revisions": ["step1000", "step2000"]}
    recipe.write_text(yaml.safe_dump({"name": "hub-avg", "sources": sources, "output": {"path": str(tmp_path / "o")}}))
    out = merge_recipe(recipe, HubClient(endpoint=hub.url, token="hf_test")).output
    prov = json.loads((out / "hubmerge.json").read_text())

    store = ResultsStore(tmp_path / "results")
    # a task whose data is a Hub dataset: model-index names it by its Hub id
    task = make_task("toy_mc", "multiple_choice", [["a", "b"]] * 4, GOLD, source="hf:org/toy-mc:test")
    tkey = store.register_task(task)
    for i, (s, name) in enumerate(zip(prov["sources"], ("step200", "step300"), strict=True)):
        # registered under the Hub names, with stand-in hashes: found by repo and commit, not by hashing
        key = store.register_model(
            [hashlib.sha256(bytes([i])).hexdigest()],
            name=f"{REPO}@{s['revision']}",
            repo=REPO,
            revision=s["revision"],
            commit=s["commit"],
        )
        store.add_logliks(loglik_rows(key, tkey, PREDS[name]))
    merged_key = store.register_model(weight_hashes_of_folder(out), name="hub-avg", path=out)
    store.add_logliks(loglik_rows(merged_key, tkey, PREDS["merged"]))

    ev = evidence_from_store(out, store)
    assert ev.scores["toy_mc"] == {"merged": 0.75, "step1000": 0.5, "step2000": 1.0}
    readme = write_card(out, ev, license="apache-2.0")
    card = ModelCard.load(readme)
    assert card.data.base_model == REPO and card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0"
    text = readme.read_text()
    for s in prov["sources"]:
        assert f"| {REPO}@{s['revision']} | `{s['commit']}` |" in text
    assert "hf-cache" not in text and "snapshots" not in text  # the pulled copies' cache paths stay private
    assert f"hubmerge eval . {REPO} --select '{{revisions: [step1000, step2000]}}' --tasks toy_mc" in text

    content = readme.read_text()
    assert validate_yaml(hub, content) == {"errors": [], "warnings": []}
    broken = content.replace("type: text-generation", "kind: text-generation")
    assert validate_yaml(hub, broken)["errors"]  # the validator does look at model-index
    hub_api.create_repo("org/hub-avg")
    hub_api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="org/hub-avg")
    assert hub_api.model_info("org/hub-avg").card_data.tags == TAGS
    check_files_match(out)


# ------------------------------------------------------------------------------------------------ plot and groups


def test_window_series_plots_real_steps_and_the_merged_model(merged):
    from hubmerge.stability.card import window_series

    labels = source_labels(json.loads((merged.out / "hubmerge.json").read_text()))
    ev = hand_evidence()
    ev.steps = {"step100": 100, "step200": 200, "step300": 300}
    series = window_series(labels, ev)
    assert series.uses_steps and series.x == [100.0, 200.0, 300.0] and series.xlabel == "training step"
    assert series.window == (100.0, 300.0) and series.merged_x == 300.0  # the merge at its newest source
    assert series.merged == {"toy_mc": 0.75, "toy_pairs": 0.625}
    assert series.scores["toy_mc"] == [0.5, 0.5, 1.0]
    # a local folder has no step (nor do steps that do not increase): the axis shows the order and says so
    for steps in (None, {"step100": 100, "step200": None, "step300": 300}, {"step100": 3, "step200": 2, "step300": 1}):
        ev.steps = steps
        series = window_series(labels, ev)
        assert not series.uses_steps and series.x == [0.0, 1.0, 2.0] and "training order" in series.xlabel


def test_evidence_from_the_store_carries_each_sources_step(merged, store):
    from hubmerge.results.keys import weight_hashes_of_folder

    assert evidence_from_store(merged.out, store).steps == dict.fromkeys(["step100", "step200", "step300"])
    for ckpt, step in zip(merged.ckpts, (100, 200, 300), strict=True):  # the store learns the steps
        store.register_model(weight_hashes_of_folder(ckpt), name=ckpt.name, step=step)
    assert evidence_from_store(merged.out, store).steps == {"step100": 100, "step200": 200, "step300": 300}


def test_source_steps_read_hub_revisions_where_the_store_has_none():
    from hubmerge.workflows.card import source_steps

    prov = {
        "sources": [
            {"repo": "EleutherAI/pythia-160m", "revision": "step142000", "commit": "a" * 40},
            {"repo": "allenai/OLMo-1B", "revision": "step20000-tokens84B", "commit": "b" * 40},
            {"path": "/ckpts/last"},
        ]
    }
    got = source_steps(prov, {"step142000": None, "step20000-tokens84B": 20000, "last": None})
    assert got == {"step142000": 142000, "step20000-tokens84B": 20000, "last": None}


def test_card_groups_from_the_store_and_the_registry():
    from hubmerge.workflows.card import card_groups

    names = ["arc_easy", "blimp_b", "blimp_a", "mmlu_x", "mmlu_y", "lonely_1"]
    got = card_groups({"mmlu": ["mmlu_x", "mmlu_y", "mmlu_z"], "lonely": ["lonely_1"]}, names)
    assert got == {"mmlu": ["mmlu_x", "mmlu_y"], "blimp": ["blimp_b", "blimp_a"]}  # one member is no group


def test_card_from_the_store_leads_with_the_group_row(merged, store, tmp_path):
    from hubmerge.results.keys import weight_hashes_of_folder
    from hubmerge.workflows.card import write_card_from_store

    folders = {p.name: p for p in merged.ckpts} | {"merged": merged.out}
    flipped = {name: [1 - p if i == 0 else p for i, p in enumerate(preds)] for name, preds in PREDS.items()}
    for task, preds in (("blimp_x", PREDS), ("blimp_y", flipped)):
        tkey = store.register_task(make_task(task, "multiple_choice", [["a", "b"]] * 4, GOLD, "pairs.jsonl"))
        for name, folder in folders.items():
            key = store.register_model(weight_hashes_of_folder(folder), name=name, path=folder)
            store.add_logliks(loglik_rows(key, tkey, preds[name]))
    readme = write_card_from_store(merged.out, tmp_path / "results")
    text = readme.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header == "| model | **blimp** (pooled, acc) | blimp_x (acc) | blimp_y (acc) | toy_mc (acc) |"
    # merged: blimp_x 1 1 1 0, blimp_y 0 1 1 0 -> 5 of 8
    assert "| **merged (this model)** | 0.6250 ± " in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and " | acc | " in line]
    assert rows == ["| **blimp** (pooled)", "| blimp_x", "| blimp_y", "| toy_mc"] * 2  # both stability tables
    assert "- `blimp`: 8 examples, pools 2 tasks: blimp_x, blimp_y" in text
    assert "--tasks blimp --data pairs.jsonl" in text  # the group stands for its members
    assert (merged.out / "stability.png").read_bytes().startswith(b"\x89PNG")
    again = write_card_from_store(merged.out, tmp_path / "results", ["blimp"])  # a group names its members
    assert "| model | **blimp** (pooled, acc) | blimp_x (acc) | blimp_y (acc) |\n" in again.read_text()


def test_a_card_asked_for_a_metric_the_task_does_not_define_says_so(merged, store):
    """A WinoGrande-like task reports acc only: a card asked for its acc_norm is one clear error, not a blank."""
    from hubmerge.errors import StoreError

    task = make_task("toy_wino", "multiple_choice", [["a", "b"]] * 4, GOLD)
    task.spec.metric_names = ["acc"]
    tkey = store.register_task(task)
    merged_key = next(m["model_key"] for m in store.models() if "merged" in (m["names"] or []))
    store.add_logliks(loglik_rows(merged_key, tkey, PREDS["merged"]))
    with pytest.raises(StoreError, match="toy_wino defines no acc_norm"):
        evidence_from_store(merged.out, store, ["toy_wino"], metric="acc_norm")
    assert evidence_from_store(merged.out, store, ["toy_wino"]).scores["toy_wino"]["merged"] == 0.75
