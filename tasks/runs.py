"""Reading runs back: each run's status, a listing of an artifact root, two runs side by side.

A run folder says where it stands: `manifest.json` (complete) > `status.json` saying failed or
stopped (why, when) > anything else (incomplete: running, or killed before it could say so).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable

from tasks.compare import compare, item_values, paired_stderr
from tasks.config import OutputConfig
from tasks.layout import POINTERS, RUNS, RunPaths, new_run_id, run_dir
from tasks.leftovers import process_gone, process_mark
from tasks.run_ending import ending_enforced
from tasks.runtime import RUN_TIMEOUT_ENV, run_logger
from tasks.storage import ArtifactStore, StorageError

# What the flows name their runs: `<UTC date>-<time>-<flow run name>`, `eval-` first for smolflow eval.
RUN_ID = re.compile(r"(eval-)?\d{8}-[\w-]*")


def write_status(run: ArtifactStore, state: str, why: str | None = None, **extra) -> None:
    """status.json: running / failed (with why) / complete, and when."""
    run.write_json(RunPaths.status, {"state": state, "why": why, "at": datetime.now(timezone.utc).isoformat(), **extra})


def failure_reason(err: BaseException) -> str:
    """One line for a status file: the error's own message, not a traceback."""
    if type(err).__name__ == "CancelledError" and type(err).__module__.startswith("prefect."):
        # What the flow's own code sees when Prefect's flow timeout fires (tasks/runtime.py run_timeout).
        hours = os.environ.get(RUN_TIMEOUT_ENV, "")
        return f"timed out: the run took longer than {RUN_TIMEOUT_ENV}={hours} h" if hours else "cancelled by Prefect"
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}" if message else "".join(traceback.format_exception_only(err)).strip()


def stop_reason(err: BaseException) -> str | None:
    """Why a run that was stopped on purpose stopped (Ctrl-C, a cancel in Prefect); None: it failed."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)"
    if isinstance(err, TerminationSignal):  # Prefect's cancel, or serve/worker stopped, send SIGTERM
        return (f"stopped by {signal.Signals(err.signal).name}: cancelled in Prefect, or the process "
                "running it was stopped")
    return None


def flow_run_id(root: str, prefix: str = "") -> str:
    """A new run's id (`prefix`, the time, the flow run's name), stamped with the time its flow run
    first started, not this attempt's: the flow run page's Retry runs the same flow run again, and
    with the same id it carries on in the earlier attempt's folder (its checkpoints: training resumes;
    its W&B run; its status), as a re-run with that `output.run_id` does, rather than training from
    step 0 in a new folder beside a stopped one. A retried run that had completed gets a new id:
    run folders are written once."""
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run

    context = FlowRunContext.get()
    if started := context and context.flow_run and context.flow_run.start_time:
        run_id = new_run_id(f"{prefix}{started.astimezone(timezone.utc):%Y%m%d-%H%M%S}", flow_run.get_name())
        if not ArtifactStore(root).child(run_dir(run_id)).exists(RunPaths.manifest):
            return run_id
    return new_run_id(f"{prefix}{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", flow_run.get_name())


def run_status(run: ArtifactStore) -> dict[str, Any]:
    """{'state': complete | failed | stopped | incomplete, 'why', 'at'} of one run folder."""
    if run.exists(RunPaths.manifest):
        manifest = run.read_json(RunPaths.manifest)
        return {"state": "complete", "why": None, "at": manifest.get("completed_at")}
    status = run.read_json(RunPaths.status) if run.exists(RunPaths.status) else {}
    if status.get("state") in ("failed", "stopped"):
        return status
    if status.get("state") == "running":
        # A SIGKILL, the out-of-memory killer or a power cut leaves "running" for good: the process
        # that wrote it says whether it still lives, where this reader can see it (tasks/leftovers.py).
        who = f"pid {status.get('pid')} on {status.get('host')}, started {status.get('started_at')}"
        gone = process_gone(status)
        if gone:
            return {**status, "state": "failed", "at": None,
                    "why": f"killed: its process ended without a word (SIGKILL, the out-of-memory killer, or "
                           f"the machine restarted): {who}"}
        if gone is False:
            return {**status, "state": "incomplete", "why": f"running ({who})", "at": None}
        if status.get("pid"):
            return {**status, "state": "incomplete", "at": None,
                    "why": f"no manifest: running ({who}; not this machine, which cannot tell), or killed there"}
    return {"state": "incomplete", "why": "no manifest: still running, or stopped before it could finish", "at": None}


FLOW_RUN = "prefect_flow_run"  # status.json: the id of the Prefect flow run that wrote it


def end_killed_flow_runs(root: str, running: str | None = None) -> list[str]:
    """The Prefect flow runs of runs under `root` killed outright on this machine (run_status: 'killed:
    ...'), where this server still has them unfinished: set Crashed, with the run's why. A SIGKILL (the
    out-of-memory killer, a reboot) runs no hook, and nothing else ends them: a killed cron night said
    Running in the Prefect UI for good (a served one is ended by the process that serves it). Flow
    runs this server does not know (another server's, vacuumed) are left alone. Returns the run ids
    whose flow runs it ended."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    store = ArtifactStore(root)
    killed = {}
    for rel in store.glob("runs/*/status.json") if store.exists("runs") else ():
        run_id = rel.split("/")[1]
        try:
            status = run_status(store.child("runs", run_id))
        except (FileNotFoundError, ValueError):
            continue  # written or removed between the listing and the read: the next run sees it
        if run_id != running and status.get(FLOW_RUN) and str(status.get("why") or "").startswith("killed: "):
            killed[run_id] = status
    ended = []
    if killed:
        with get_client(sync_client=True) as client:
            for run_id, status in killed.items():
                try:
                    state = client.read_flow_run(UUID(str(status[FLOW_RUN]))).state
                except (ObjectNotFound, ValueError):
                    continue
                if state is not None and not state.is_final():
                    client.set_flow_run_state(status[FLOW_RUN], Crashed(message=f"run {run_id}: {status['why']}"),
                                              force=True)
                    ended.append(run_id)
    return ended


def _read(run: ArtifactStore, rel: str, default=None):
    return run.read_json(rel) if run.exists(rel) else default


def headline(run: ArtifactStore) -> dict[str, float]:
    """{benchmark: the tuned model's score} (or the evaluated model's, for an eval run)."""
    table = _read(run, RunPaths.comparison)
    if table:
        return {r["benchmark"]: r["tuned"] for r in table}
    found = {}
    for rel in run.glob(f"{RunPaths.benchmarks}/**/model.summary.json"):
        summary = run.read_json(rel)
        found[summary.get("name", rel)] = round(summary["score"], 4)
    return found


def _summary(run: ArtifactStore, name: str) -> dict | None:
    """The tuned model's saved score (or the evaluated model's, for an eval run)."""
    return _read(run, RunPaths.benchmark_summary(name, "tuned")) or _read(run, RunPaths.benchmark_summary(name, "model"))


def sources(run: ArtifactStore) -> dict[str, str]:
    """{benchmark: where its items came from, and whether published scores compare}."""
    out = {}
    for name in headline(run):
        prov = (_summary(run, name) or {}).get("provenance") or {}
        out[name] = prov.get("note") or prov.get("source") or "unknown source"
    return out


def runs_root(root: str) -> ArtifactStore:
    """The store at `--root` of runs, compare and gc, or one line naming --root (exit 2) where it
    can hold no runs: a scheme output.artifacts_uri refuses, a local folder that is missing or a
    file, an S3 root whose credentials, endpoint or bucket do not work (a typo there once listed
    "no runs", exit 0). An existing folder without runs is a root with none yet."""
    try:
        OutputConfig._known_scheme(root)  # the same schemes as output.artifacts_uri
        store = ArtifactStore(root)
        # S3 only: check_access's local half would refuse a read-only folder, which can be listed. A
        # prefix first: exists() of a bucket alone says False for wrong credentials, which a prefix
        # says as they are (access denied), and a root with runs needs no more requests.
        if store.is_s3 and not store.exists(RUNS):
            store.check_access()
    except StorageError as err:
        raise StorageError(f"--root: {err}") from None
    except ValueError as err:
        raise ValueError(f"--root: {err}") from None
    if not store.is_s3 and not os.path.isdir(store.root):
        what = "is a file, not a folder" if os.path.exists(store.root) else "does not exist"
        raise FileNotFoundError(f"--root: {store.root} {what}. Give the folder the runs were written to "
                                "(their output.artifacts_uri)")
    return store


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
                     "promoted": run_id in promoted, "gate": gate_outcome(run), "losses": losses(run),
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


def promoted_now(store: ArtifactStore) -> set[str]:
    """The run ids the flows' `promoted` pointers name under a root."""
    return {store.read_json(p).get("run_id") for p in store.glob(f"{POINTERS}/*/promoted.json")}


def gate_outcome(run: ArtifactStore) -> dict[str, Any] | None:
    """{promote, reasons} as the run's gate decided (re-checked at promotion); None before a gate or for an eval run."""
    decision = _read(run, RunPaths.gate)
    return {"promote": decision["promote"], "reasons": decision["reasons"]} if decision else None


def losses(run: ArtifactStore) -> dict[str, float]:
    """{train_loss, eval_loss} of a run's training, rounded ({} for an eval run or before training ended)."""
    metrics = _read(run, RunPaths.metrics, {}) or {}
    return {k: round(metrics[k], 4) for k in ("train_loss", "eval_loss") if isinstance(metrics.get(k), (int, float))}


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
    promoted = {side: {"promoted": run_id in now, "gate": gate_outcome(run)}
                for side, run_id, run in (("a", run_a, a), ("b", run_b, b))}
    return {"runs": {"a": run_a, "b": run_b}, "status": status, "scores": scores, "settings": settings,
            "promoted": promoted, "health": health, "training": training, "data": data}


def model_of_run(root: str, run_id: str) -> dict[str, Any] | None:
    """The tuned model (a ModelRef's fields) of a completed run under root, or None if `run_id` names no
    run; ValueError if it has a run id's shape (RUN_ID) yet names neither a run nor a local folder."""
    if not run_id or "/" in run_id or run_id.startswith((".", "~")) or ":" in run_id:
        return None  # a path, a hub id (org/name) or builtin:...; not a run id
    store = ArtifactStore(root)
    run = store.child(RUNS, run_id)
    if not run.exists(RunPaths.config):
        if RUN_ID.fullmatch(run_id) and not os.path.exists(run_id):  # a mistyped run id, not a model
            raise ValueError(f"model={run_id!r}: no run {run_id!r} under {store.uri} (see "
                             "`smolflow runs`; output.artifacts_uri picks the root), nor a model folder of "
                             "that name here; a Hugging Face model is named org/name")
        return None
    status = run_status(run)
    if status["state"] != "complete":
        raise ValueError(f"model={run_id!r}: that run is {status['state']} ({status.get('why')}); "
                         "pick a completed run (see `smolflow runs`)")
    return run.read_json(RunPaths.manifest)["tuned_model"]


def served_as(run: ArtifactStore) -> str | None:
    """The Prefect deployment this run belongs to: this flow run's; on a resume with none (`smolflow run
    --output.run-id` of a served night) the one its earlier attempt ran under, as its status.json says."""
    from prefect.runtime import deployment

    if deployment.name:
        return deployment.name
    try:
        return run.read_json(RunPaths.status).get("deployment")
    except (FileNotFoundError, ValueError, AttributeError):  # a new run, or an unreadable earlier status
        return None


@contextmanager
def status_recorded(run: ArtifactStore, on_stop: Callable[[dict], None] | None = None, deployment: str | None = None):
    """status.json says 'running' during the block, 'failed' (why, when) if it raises, 'stopped' if
    it was interrupted or cancelled, 'complete' if it ends; the manifest, written before the end, is
    what marks a run complete for readers (run_status). on_stop gets that status (e.g. the W&B run
    says it too: tasks/tracking.py close_on_stop). `deployment` (served_as) is kept in every state, and
    the Prefect flow run's id, which ends a killed run's flow run (end_killed_flow_runs)."""
    from prefect.runtime import flow_run

    served = ({"deployment": deployment} if deployment else {}) | ({FLOW_RUN: flow_run.id} if flow_run.id else {})
    write_status(run, "running", started_at=datetime.now(timezone.utc).isoformat(), **served, **process_mark())
    started = run.read_json(RunPaths.status)["started_at"]
    try:
        with ending_enforced():  # a timeout or SIGTERM ends it, also where its exception was caught
            yield run
    except BaseException as err:
        stopped = stop_reason(err)
        write_status(run, "stopped" if stopped else "failed", stopped or failure_reason(err), started_at=started, **served)
        if on_stop is not None:
            try:
                on_stop(run.read_json(RunPaths.status))
            except Exception as also:  # never hides the run's own error, which status.json has
                run_logger().warning("After the run stopped: %s: %s", type(also).__name__, also)
        raise
    write_status(run, "complete", started_at=started, **served)
