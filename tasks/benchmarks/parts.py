"""Item shards: a benchmark without subsets (GSM8K, MATH, HumanEval) scored as n tasks, task k
taking items k, k+n, k+2n, ... (`execution.item_shards` on Ray), merged back item for item.

Every-n-th, not contiguous ranges: long and short items spread evenly, and the number of items
need not be known before scoring. For lm-eval tasks each shard still builds every item's prompt
and only answers its own: lm-eval draws few-shot examples item after item from one seeded
generator, so a shard that built only its own items would draw other examples than the whole run
does (lm-eval's own data-parallel ranks have that problem). Building prompts takes well under a
second; only the model's answers cost.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM

Part = tuple[int, int]  # (k, n): items k, k+n, k+2n, ... (0-based)


def in_part(index: int, part: Part | None) -> bool:
    return part is None or index % part[1] == part[0]


def describe(part: Part) -> str:
    k, n = part
    return f"items {k}, {k + n}, {k + 2 * n}, ... (shard {k + 1} of {n})"


class PartLM(LM):
    """Any lm-eval LM, answering only the requests of one part's items; the others get an empty
    answer that `restrict` then drops with the item."""

    def __init__(self, lm: LM, part: Part):
        super().__init__()
        self.lm, self.part = lm, part

    def _answer(self, method: str, requests: list, empty: Any) -> list:
        mine = [r for r in requests if in_part(r.doc_id, self.part)]
        answers = iter(getattr(self.lm, method)(mine) if mine else [])
        return [next(answers) if in_part(r.doc_id, self.part) else empty for r in requests]

    def loglikelihood(self, requests):
        return self._answer("loglikelihood", requests, (float("-inf"), False))

    def loglikelihood_rolling(self, requests):
        return self._answer("loglikelihood_rolling", requests, float("-inf"))

    def generate_until(self, requests):
        return self._answer("generate_until", requests, "")

    # What lm-eval asks of the model itself besides answers.
    def apply_chat_template(self, *args, **kwargs):
        return self.lm.apply_chat_template(*args, **kwargs)

    def chat_template(self, chat_template=False):
        return self.lm.chat_template(chat_template)

    @property
    def tokenizer_name(self) -> str:
        return self.lm.tokenizer_name

    def __getattr__(self, name: str):  # model, tokenizer, ...: the wrapped LM's
        if name == "lm":
            raise AttributeError(name)
        return getattr(self.lm, name)


def restrict(out: dict[str, Any], part: Part) -> dict[str, dict[str, list[float]]]:
    """simple_evaluate's output cut down to one part's items, in place, as if lm-eval had scored only
    those: samples, the per-item counts and every mean metric (and its stderr) recomputed with
    lm-eval's own functions. Returns each task's per-item values by "metric,filter" in item order,
    for `merge_values` to rebuild the whole run's metrics exactly."""
    values_by_task = {}
    for task, samples in out["samples"].items():
        kept = [s for s in samples if in_part(s["doc_id"], part)]  # lm-eval's order: item order per filter
        out["samples"][task] = kept
        aggregations = {m["metric"]: m.get("aggregation") for m in out["configs"][task].get("metric_list") or []}
        if any(a != "mean" for a in aggregations.values()):
            raise ValueError(f"{task}: item shards merge mean metrics only, not {aggregations}")
        values: dict[str, list[float]] = {}
        for s in kept:
            for metric in aggregations:
                if isinstance(s.get(metric), (int, float, bool)):
                    values.setdefault(f"{metric},{s['filter']}", []).append(float(s[metric]))
        values_by_task[task] = values
        results = {k: v for k, v in out["results"][task].items() if "," not in k}  # alias, sample_len
        out["results"][task] = results | aggregate(values)
        ids = {s["doc_id"] for s in kept}
        if task in out.get("n-samples", {}):
            out["n-samples"][task]["effective"] = len(ids)
    return values_by_task


def aggregate(values: dict[str, list[float]]) -> dict[str, float | str]:
    """lm-eval's mean and its standard error for each "metric,filter", as its evaluator reports them."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    stderr = stderr_for_metric(metric=mean, bootstrap_iters=100000)  # simple_evaluate's default
    out: dict[str, float | str] = {}
    for key, items in values.items():
        metric, _, filt = key.partition(",")
        out[key] = mean(items)
        out[f"{metric}_stderr,{filt}"] = stderr(items) if len(items) > 1 else "N/A"
    return out


def interleave(lists: list[list]) -> list:
    """Part k's lists (items k, k+n, ...) back into item order."""
    return [x for row in range(max(map(len, lists), default=0)) for x in (lst[row] for lst in lists if row < len(lst))]


def merge_values(parts: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-item values by "metric,filter" of parts 0..n-1, in item order."""
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: interleave([p.get(k, []) for p in parts]) for k in keys}
