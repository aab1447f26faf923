"""hubmerge as one of lm-evaluation-harness's models: lm-eval's runner and output files, hubmerge's scorer and store.

``lm_eval.simple_evaluate(model=HubmergeLM(pretrained="EleutherAI/pythia-160m", revision="step1000"), tasks=[...])``
keeps everything lm-eval does (its tasks, prompts, metrics, ``results_*.json`` and ``--log_samples`` files) and
sends the log-likelihood requests to hubmerge's scorer, which shares each context's forward pass across its
choices. Every scored request is also written to the results store under the same task key
``hubmerge eval --tasks lm_eval:NAME`` and ``hubmerge results import`` use, so the stability analysis sees it.

A task's store key comes from its lm-eval config when the prompts lm-eval sent are the ones that config builds
by default (0-shot unless the task says otherwise, simple_evaluate's few-shot seed); other prompts (a
``num_fewshot`` override, another seed) get a key of their own, made from the prompts, so rows of different
prompts never mix. Generation requests raise lm-eval's ``NotImplementedError``: hubmerge does not generate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM

from hubmerge.errors import RecipeError
from hubmerge.evaluation.runner import EvalTarget, materialise, target_from_folder, targets_from_hub
from hubmerge.evaluation.tasks import lm_eval_tasks as bridge
from hubmerge.evaluation.tasks.specs import Request, TaskData
from hubmerge.hub.client import HubClient
from hubmerge.hub.revisions import selector_from_data
from hubmerge.io.progress import QUIET
from hubmerge.results.keys import task_key
from hubmerge.results.lm_eval_samples import task_identity
from hubmerge.results.store import ResultsStore, loglik_rows

try:  # lm-eval's registry, so that ``lm_eval --model hubmerge`` works once this module is imported
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - every 0.4 release has it
    register_model = None  # type: ignore[assignment]


def _prompts_identity(config: dict[str, Any], instances: Sequence[Any]) -> str:
    """A key for prompts other than the config's defaults: the config and every (doc, choice, context, cont)."""
    h = hashlib.sha256(b"lm-eval-prompts-v1\n")
    h.update(task_identity(config).encode())
    for inst in sorted(instances, key=lambda i: (i.doc_id, i.idx)):
        h.update(json.dumps([inst.doc_id, inst.idx, *map(str, inst.args[:2])], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


class HubmergeLM(LM):
    """An ``lm_eval.api.model.LM`` scoring through hubmerge and recording every score in the results store.

    ``pretrained``: a model folder, or a Hub repo id (with ``revision``, default ``main``) pulled into the HF
    cache through hubmerge's client (``endpoint``/``token`` as ``huggingface_hub`` reads them unless given).
    ``results``: the results folder (default as ``hubmerge eval``: ``$HUBMERGE_RESULTS`` or
    ``./hubmerge-results``); ``store=False`` scores without recording. ``include_path``: the task folders given
    to lm-eval, so that the store can learn the gold answers of your own tasks. ``batch_size``: requests per
    forward pass ("auto" or none: by token budget).
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        *,
        results: str | Path | None = None,
        store: bool = True,
        include_path: str | Sequence[str] | None = None,
        device: str | None = "cpu",
        batch_size: int | str | None = None,
        dtype: str = "float32",
        endpoint: str | None = None,
        token: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise RecipeError(
                f"HubmergeLM: unknown model_args {', '.join(sorted(unknown))}; it takes pretrained, revision, results, "
                "store, include_path, device, batch_size, dtype, endpoint, token"
            )
        from hubmerge.evaluation.scoring import load_model

        self.client = HubClient(endpoint=endpoint, token=token) if endpoint or token else HubClient()
        self.target = self._target(str(pretrained), revision)
        self.path = materialise(self.target, self.client, QUIET)
        self._device = device or "cpu"
        self.model, self.tokenizer = load_model(self.path, device=self._device, dtype=dtype)
        auto = batch_size is None or str(batch_size).startswith("auto")  # lm-eval's "auto" / "auto:N"
        self.batch_size = None if auto else int(batch_size)  # type: ignore[arg-type]
        self.results = ResultsStore(results) if store else None
        inc = [include_path] if isinstance(include_path, str) else list(include_path or [])
        self.include = [p for item in inc for p in str(item).split(":") if p]
        self._tasks: dict[str, Any] = {}
        self.notices: list[str] = []
        if self.results is not None:
            self.results.register_checkpoint(self.target)

    def _target(self, pretrained: str, revision: str | None) -> EvalTarget:
        if Path(pretrained).expanduser().is_dir():
            return target_from_folder(Path(pretrained).expanduser(), label=revision)
        selector = selector_from_data({"revisions": [revision or "main"]}, where="HubmergeLM(revision=...)")
        (target,) = targets_from_hub(pretrained, selector, self.client)
        return target

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    # -- scoring -----------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from hubmerge.evaluation.scoring import score_requests

        reqs = [Request(int(r.doc_id or 0), int(r.idx), *map(str, r.args[:2])) for r in requests]
        scored = score_requests(self.model, self.tokenizer, reqs, batch_size=self.batch_size, device=self._device)
        self._record(requests, scored)
        return [(float(s.logprob), bool(s.is_greedy)) for s in scored]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from hubmerge.evaluation.scoring import rolling_loglikelihood

        texts = [str(r.args[0]) for r in requests]
        scored = rolling_loglikelihood(
            self.model, self.tokenizer, texts, batch_size=self.batch_size, device=self._device
        )
        self._record(requests, scored)
        return [float(lp) for lp, _ in scored]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        names = sorted({str(r.task_name) for r in requests})
        raise NotImplementedError(
            f"HubmergeLM does not generate text: {', '.join(names)} sent generate_until requests; hubmerge scores "
            "log-likelihood tasks only (multiple_choice, loglikelihood, loglikelihood_rolling). Run generation "
            "tasks with another lm-eval model, e.g. --model hf"
        )

    # -- the results store -------------------------------------------------------------------------------------

    def _task(self, name: str) -> Any:
        if name not in self._tasks:
            self._tasks[name] = bridge.load_task_object(name, self.include)
        return self._tasks[name]

    def _identity(self, task: Any, instances: Sequence[Any]) -> str | None:
        """The config's key when lm-eval sent the prompts that config builds by default; else a key of the prompts."""
        config = {"task": task.config.task, **task.dump_config()}
        bridge.prepare(task)
        last = max(int(i.doc_id) for i in instances)
        built = {(int(i.doc_id), int(i.idx)): tuple(i.args[:2]) for i in bridge.build_requests(task, last + 1)}
        if all(built.get((int(i.doc_id), int(i.idx))) == tuple(i.args[:2]) for i in instances):
            return None
        self.notices.append(
            f"{task.config.task}: lm-eval sent other prompts than the task's defaults (a num_fewshot or seed "
            "override); its scores are stored under a key of those prompts"
        )
        return _prompts_identity(config, instances)

    def _record(self, requests: Sequence[Any], scored: Sequence[Any]) -> None:
        """Store the scores of every complete document, task by task."""
        if self.results is None:
            return
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_task.setdefault(str(r.task_name), []).append(i)
        for name, rows in by_task.items():
            task = self._task(name)
            if task is None:
                self.notices.append(
                    f"{name}: not a task lm-eval's TaskManager knows here (pass include_path=... to HubmergeLM); "
                    "its scores are not stored"
                )
                continue
            instances = [requests[i] for i in rows]
            data = bridge.to_task_data(task, instances, self._identity(task, instances))
            self._store(data, instances, [scored[i] for i in rows])

    def _store(self, data: TaskData, instances: Sequence[Any], scored: Sequence[Any]) -> None:
        assert self.results is not None
        tkey = task_key(data.name, data.data_hash)
        with self.results.transaction():
            self.results.register_task(data)
            if data.kind == "perplexity":
                keys = [(int(i.doc_id), 0) for i in instances]
                self.results.add_logliks(loglik_rows(self.target.key, tkey, keys, scored))
                return
            # the conditional requests, then acc_mutual_info's unconditional ones (request idx n..2n-1)
            n = {ex.doc_id: len(ex.requests) for ex in data.examples}
            keys = [(int(i.doc_id), int(i.idx)) for i in instances]
            conditional = [k for k, (doc, idx) in enumerate(keys) if idx < n[doc]]
            unconditional = [k for k, (doc, idx) in enumerate(keys) if idx >= n[doc]]
            rows = loglik_rows(self.target.key, tkey, [keys[k] for k in conditional], [scored[k] for k in conditional])
            self.results.add_logliks(rows)
            if unconditional:
                shifted = [(keys[k][0], keys[k][1] - n[keys[k][0]]) for k in unconditional]
                rows = loglik_rows(self.target.key, tkey, shifted, [scored[k] for k in unconditional])
                self.results.add_unconditional(rows)


if register_model is not None:
    register_model("hubmerge")(HubmergeLM)
