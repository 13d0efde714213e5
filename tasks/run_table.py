"""What `smolflow runs` and `smolflow compare` show: the runs under an artifact root listed, two
side by side. Scores only with the one comparison (tasks/compare.py), eval losses said apart when
measured on other rows, template or max_length, settings by name (tasks/runs.py reads each run)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tasks.compare import compare, item_values, paired_stderr
from tasks.layout import POINTERS, RUNS, RunPaths
from tasks.runs import _read, _summary, headline, losses, run_status, runs_root, sources
from tasks.storage import ArtifactStore


def list_runs(root: str) -> list[dict[str, Any]]:
    """Every run folder under root, oldest first: id, start time, status, promoted (now) and its gate's
    decision, headline scores."""
    store = runs_root(root)
    ids = sorted({path.split("/")[1] for path in store.glob(f"{RUNS}/*/{RunPaths.config}")})
    promoted = promoted_now(store)
    rows, measured, ways = [], [], {}
    for run_id in ids:
        run = store.child(RUNS, run_id)
        status = run_status(run)
        started = _read(run, RunPaths.status, {}).get("started_at") or run_id[:15]
        rows.append({"run_id": run_id, "started": started, "status": status["state"], "why": status.get("why"),
                     "promoted": run_id in promoted, "by_hand": promoted.get(run_id), "gate": gate_outcome(run), "losses": losses(run),
                     "scores": headline(run), "sources": sources(run)})
        if "eval_loss" in rows[-1]["losses"]:
            ways[run_id] = eval_loss_way(run)
        measured.append({name: ((s := _summary(run, name) or {}).get("comparability_key"), s.get("comparability"))
                         for name in rows[-1]["scores"]})
    # Eval losses measured alike have equal keys.
    for row, way in zip((r for r in rows if r["run_id"] in ways), same_rows_by(list(ways.values())), strict=True):
        row["eval_loss_measured"] = hashlib.sha256(json.dumps(way, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return _by_series(rows, measured)


def _by_series(rows: list[dict], measured: list[dict[str, tuple]]) -> list[dict]:
    """A benchmark measured different ways across the runs listed is a column per way, named as the
    score trend names its series (`mmlu [cloze]`, `mmlu [mcq]`): `mmlu=0.5833` beside `mmlu=0.0833`
    read as one measure."""
    from tasks.trends import series_labels

    ways: dict[str, dict] = {}
    for by_name in measured:
        for name, (key, parts) in by_name.items():
            ways.setdefault(name, {}).setdefault(key, parts)
    labels = {name: series_labels(name, by_key) for name, by_key in ways.items() if len(by_key) > 1}
    for row, by_name in zip(rows, measured, strict=True):
        for field in ("scores", "sources"):
            row[field] = {labels[n][by_name[n][0]] if n in labels else n: v for n, v in row[field].items()}
    return rows


def promoted_now(store: ArtifactStore) -> dict[str, dict | None]:
    """The run ids the flows' `promoted` pointers name under a root: who promoted each by hand and
    why (`smolflow promote`), else None (its gate)."""
    pointers = (store.read_json(p) for p in store.glob(f"{POINTERS}/*/promoted.json"))
    return {p.get("run_id"): p.get("by_hand") for p in pointers}


def gate_outcome(run: ArtifactStore) -> dict[str, Any] | None:
    """{promote, reasons} as the run's gate decided (re-checked at promotion); None before a gate or for an eval run."""
    decision = _read(run, RunPaths.gate)
    return {"promote": decision["promote"], "reasons": decision["reasons"]} if decision else None


def _named(value: Any) -> bool:
    """A list of settings each named by a unique `name` (benchmarks, custom_benchmarks)."""
    names = [v.get("name") for v in value if isinstance(v, dict)] if isinstance(value, list) else []
    return bool(names) and len(names) == len(value) and None not in names and len(set(names)) == len(names)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys; a named list's items by name (`benchmarks[gsm8k].limit`), so one benchmark's
    changed limit is one row, not the whole list, and its order does not count as a difference."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if _named(value):
        out = {}
        for item in value:
            fields = {k: v for k, v in item.items() if k != "name"}
            out |= _flat(fields, f"{prefix}[{item['name']}]") if fields else {f"{prefix}[{item['name']}]": {}}
        return out
    return {prefix: value}


def _item(key: str) -> str | None:
    return key[:key.index("]") + 1] if "[" in key else None


def _whole_items(flat: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """An item (a benchmark) that only this run has, as one row: its settings together."""
    theirs = {_item(k) for k in other}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        item = _item(key)
        if item is None or item in theirs:
            out[key] = value
        else:
            field = key[len(item) + 1:]  # "" for an item with no field but its name
            out[item] = out.get(item, {}) | ({field: value} if field and value is not None else {})
    return out


# A None that means another setting's value (config_eval.py), compared as that value: an older
# config.json stored it resolved (`judge.max_new_tokens 8`), a newer one None, for the same run.
FOLLOWS = {"judge.max_new_tokens": "sampling.max_new_tokens"}


def _effective(flat: dict[str, Any], key: str, unset: str) -> Any:
    value = flat.get(key, unset)
    return flat[FOLLOWS[key]] if value is None and FOLLOWS.get(key) in flat else value


def _shown(flat: dict[str, Any], key: str, unset: str) -> Any:
    value = flat.get(key, unset)
    return f"None (= {FOLLOWS[key]} {flat[FOLLOWS[key]]})" if value is None and FOLLOWS.get(key) in flat else value


class _Score:
    def __init__(self, row: dict):
        self.score, self.stderr = row["score"], row.get("stderr")


def _items(run: ArtifactStore, name: str) -> dict[str, float] | None:
    """The tuned (or evaluated) model's per-item values on a benchmark (compare.item_values), if recorded."""
    path = next((p for role in ("tuned", "model") if run.exists(p := RunPaths.benchmark_records(name, role))), None)
    if path is None:
        return None
    return item_values([json.loads(line) for line in run.read_text(path).splitlines() if line.strip()]) or None


_EVAL_LOSS_SETTINGS = ("template.", "training.max_length")


def eval_loss_way(run: ArtifactStore) -> dict[str, Any]:
    """What a run's eval loss was measured on. It is a mean over the test split's tokens as templated
    and cut: on other rows, another template or another max_length it is another measure, whatever the
    two numbers say. The rows by content (`test_digest`) and by datasets' fingerprint (older runs have
    only that; it also changes with the files' paths): see `same_rows_by`."""
    data = (_read(run, RunPaths.manifest, {}) or {}).get("dataset") or {}
    config = _flat(_read(run, RunPaths.config, {}))
    return {"test_digest": data.get("test_digest"), "fingerprint": data.get("fingerprint"),
            **{k: v for k, v in sorted(config.items()) if k.startswith(_EVAL_LOSS_SETTINGS)}}


def same_rows_by(ways: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ways with their test rows named one way for all: by content where every run recorded it,
    else (a run from before smolflow recorded it) by datasets' fingerprint."""
    key = "test_digest" if all(w["test_digest"] for w in ways) else "fingerprint"
    return [{"test rows": w[key], **{k: v for k, v in w.items() if k not in ("test_digest", "fingerprint")}}
            for w in ways]


def compare_runs(root: str, run_a: str, run_b: str) -> dict[str, Any]:
    """Scores (with the one comparison), settings, promotion, health and data of two runs, side by side."""
    store = runs_root(root)
    a, b = store.child(RUNS, run_a), store.child(RUNS, run_b)
    for run_id, run in ((run_a, a), (run_b, b)):
        if not run.exists(RunPaths.config):
            raise FileNotFoundError(f"run {run_id!r}: no such run under {store.uri} (see `smolflow runs`)")
    scores = []
    for name in sorted(set(headline(a)) | set(headline(b))):
        sa, sb = _summary(a, name), _summary(b, name)
        row = {"benchmark": name, "a": sa and round(sa["score"], 4), "b": sb and round(sb["score"], 4),
               "n_a": sa and sa.get("n"), "n_b": sb and sb.get("n")}
        if sa and sb:
            # Only scores measured the same way (equal comparability keys) have a delta: then on the
            # same items, compared item by item as the gate does.
            comparable = sa.get("comparability_key") == sb.get("comparability_key")
            notes = [(s.get("provenance") or {}).get("note") or "" for s in (sa, sb)]
            row["source"] = notes[1] if notes[0] == notes[1] else f"A: {notes[0]}; B: {notes[1]}"
            if comparable:
                c = compare(_Score(sa), _Score(sb), paired=paired_stderr(_items(a, name), _items(b, name)))
                row |= {"delta": c["delta"], "beyond_noise": c["beyond_noise"], "stderr": c["stderr"]}
            else:
                from tasks.benchmarks.provenance import why_not_comparable

                row |= {"delta": f"not comparable ({why_not_comparable(sa.get('comparability'), sb.get('comparability'))})",
                        "beyond_noise": "n/a"}
        else:  # scored in one run only
            side, s = ("A", sa) if sa else ("B", sb or {})
            row["source"] = f"{side}: {(s.get('provenance') or {}).get('note') or 'unknown'}"
        scores.append(row)
    ca, cb = _flat(_read(a, RunPaths.config, {})), _flat(_read(b, RunPaths.config, {}))
    ca, cb = _whole_items(ca, cb), _whole_items(cb, ca)
    # A setting one run's config.json lacks (an older smolflow's, or an eval run's training.*) is said
    # so: it showed as None, read as "set to None" (`gate.rescore_promoted None` against `True`).
    def unset(key: str) -> str:
        return f"(not in its {key[:key.index('[')]})" if _item(key) else "(not in its config.json)"

    settings = [{"setting": k, "a": _shown(ca, k, unset(k)), "b": _shown(cb, k, unset(k)),
                 "differs": _effective(ca, k, unset(k)) != _effective(cb, k, unset(k))}
                for k in sorted(set(ca) | set(cb))]
    health = {"a": _read(a, RunPaths.health, {}).get("healthy"), "b": _read(b, RunPaths.health, {}).get("healthy")}
    training = {"a": losses(a), "b": losses(b)}
    data = {side: (_read(run, RunPaths.manifest, {}) or {}).get("dataset", {}) for side, run in (("a", a), ("b", b))}
    data = {side: {k: d.get(k) for k in ("source", "fingerprint", "rows", "test_digest")} for side, d in data.items()}
    if all("eval_loss" in t for t in training.values()):
        way_a, way_b = same_rows_by([eval_loss_way(a), eval_loss_way(b)])
        training["eval_loss_apart"] = [k for k in {**way_a, **way_b} if way_a.get(k) != way_b.get(k)]
    status = {"a": run_status(a)["state"], "b": run_status(b)["state"]}
    now = promoted_now(store)
    promoted = {side: {"promoted": run_id in now, "by_hand": now.get(run_id), "gate": gate_outcome(run)}
                for side, run_id, run in (("a", run_a, a), ("b", run_b, b))}
    return {"runs": {"a": run_a, "b": run_b}, "status": status, "scores": scores, "settings": settings,
            "promoted": promoted, "health": health, "training": training, "data": data}
