"""status.json of a run that ends early: 'failed' with the error, or 'stopped' when someone stopped
it on purpose (Ctrl-C, a cancel in Prefect, which arrives as SIGTERM); `smolflow runs` shows which.
And SMOLFLOW_RUN_TIMEOUT_HOURS, which ends a run that hangs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import TerminationSignal

from tasks.run_table import list_runs
from tasks.runs import status_recorded
from tasks.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_stopped_on_purpose_says_stopped_and_a_failed_one_says_why(tmp_path):
    root = ArtifactStore(str(tmp_path))
    for run_id, err in (("ctrl-c", KeyboardInterrupt()), ("cancelled", TerminationSignal(signal.SIGTERM)),
                        ("broken", ValueError("no such column 'messages'"))):
        run = root.child("runs", run_id)
        run.write_json("config.json", {})  # a run writes its config first (what `smolflow runs` lists)
        with pytest.raises(type(err)), status_recorded(run):
            raise err
    rows = {r["run_id"]: r for r in list_runs(str(tmp_path))}
    assert (rows["ctrl-c"]["status"], rows["ctrl-c"]["why"]) == ("stopped", "interrupted (Ctrl-C or SIGINT)")
    assert rows["cancelled"]["status"] == "stopped"
    assert rows["cancelled"]["why"].startswith("stopped by SIGTERM: cancelled in Prefect")
    assert (rows["broken"]["status"], rows["broken"]["why"]) == ("failed", "ValueError: no such column 'messages'")


def test_a_killed_run_says_killed_not_running_forever(tmp_path):
    """A SIGKILL (the out-of-memory killer's) skips every handler: status.json said 'running' for good,
    and `smolflow runs`, `gc` and `eval --model <run>` called it "may still be running". The process
    that wrote it is named there, so a reader on the same machine tells a live run from a dead one."""
    # Each holder is "a run at work" until its stdin closes: the test's own end (or death) ends it,
    # so nothing outlives the test, whatever fails in it.
    holder = ("import sys; from tasks.runs import status_recorded; from tasks.storage import ArtifactStore\n"
              "run = ArtifactStore(sys.argv[1]).child('runs', sys.argv[2]); run.write_json('config.json', {})\n"
              "with status_recorded(run):\n    print('in', flush=True); sys.stdin.read()\n")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for run_id in ("live", "killed"):
            procs[run_id] = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path), run_id], cwd=ROOT,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert procs[run_id].stdout.readline() == "in\n"
        procs["killed"].kill()
        procs["killed"].wait(timeout=30)
        # Written elsewhere (another machine on a shared S3 root): this reader cannot tell, and says so.
        elsewhere = ArtifactStore(str(tmp_path)).child("runs", "elsewhere")
        elsewhere.write_json("config.json", {})
        elsewhere.write_json("status.json", {"state": "running", "pid": 4242, "host": "gpu-node-7", "boot_id": "x",
                                             "started_at": "2026-12-05T02:00:00+00:00"})
        rows = {r["run_id"]: r for r in list_runs(str(tmp_path))}
        assert rows["killed"]["status"] == "failed", rows["killed"]
        assert rows["killed"]["why"].startswith("killed: its process ended without a word (SIGKILL, the out-of-memory")
        assert f"): pid {procs['killed'].pid} on " in rows["killed"]["why"]
        assert rows["live"]["status"] == "incomplete"
        assert rows["live"]["why"].startswith(f"running (pid {procs['live'].pid} on "), rows["live"]
        assert rows["elsewhere"]["status"] == "incomplete" and "on gpu-node-7" in rows["elsewhere"]["why"]
        # gc keeps both young runs, and says which one ended (kept for a re-run) and which may be running.
        gc = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "gc", "--dry-run", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=dict(os.environ, SMOLFLOW_CACHE=str(tmp_path / "cache")))
        lines = {line.split("|")[1].strip(): line for line in gc.stdout.splitlines() if line.count("|") > 3}
        assert "failed, last written" in lines["killed"] and "kept for a re-run" in lines["killed"], gc.stdout
        assert "may still be running" in lines["live"], gc.stdout
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=30)
    # The same pid given to another process later (a reuse) is not the run's: its start time differs.
    status = json.loads((tmp_path / "runs/live/status.json").read_text())
    (tmp_path / "runs/live/status.json").write_text(json.dumps(status | {"pid": os.getpid()}))
    assert {r["run_id"]: r for r in list_runs(str(tmp_path))}["live"]["status"] == "failed"


def test_a_killed_runs_flow_run_is_ended_crashed_by_the_next_run(tmp_path):
    """A SIGKILLed cron night's Prefect flow run said Running in the UI for good (no hook runs, and
    nothing serves it). The next run's start ends it Crashed with the run's why, on a real Prefect
    server; a live run's flow run, and flow runs this server does not know, are left as they are."""
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running, StateType

    from tasks.config import OutputConfig
    from tasks.leftovers import process_mark
    from tasks.bookkeeping import tidy_before_run
    from tasks.runs import FLOW_RUN, end_killed_flow_runs

    @flow(name="smolflow-test-killed")
    def night():
        pass

    gone = json.loads(subprocess.run(  # a process that has exited: what a SIGKILLed run's status names
        [sys.executable, "-c", "import json; from tasks.leftovers import process_mark; print(json.dumps(process_mark()))"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=True).stdout)
    with get_client(sync_client=True) as client:
        ids = {name: client.create_flow_run(night, name=name, state=Running()).id for name in ("killed", "live")}
        marks = {"killed": gone, "live": process_mark(), "elsewhere": gone}
        ids["elsewhere"] = uuid.uuid4()  # another server's flow run (or one vacuumed since)
        for name, mark in marks.items():
            run = ArtifactStore(str(tmp_path)).child("runs", name)
            run.write_json("status.json", {"state": "running", "started_at": "2026-12-06T02:00:00+00:00", **mark,
                                           FLOW_RUN: str(ids[name])})
        tidy_before_run(OutputConfig(artifacts_uri=str(tmp_path)), "tonight")  # where a run's start calls it
        killed, live = (client.read_flow_run(ids[name]).state for name in ("killed", "live"))
        assert killed.type == StateType.CRASHED and killed.message.startswith("run killed: killed: its process ended")
        assert live.type == StateType.RUNNING
        assert end_killed_flow_runs(str(tmp_path)) == []  # ended once
    # A flow run records its id where a later run finds it (tasks/runs.py status_recorded).
    run = ArtifactStore(str(tmp_path)).child("runs", "recorded")

    @flow(name="smolflow-test-recorded")
    def recorded() -> str:
        from prefect.runtime import flow_run

        with status_recorded(run):
            assert run.read_json("status.json")[FLOW_RUN] == flow_run.id
        return flow_run.id

    flow_run_id = recorded()
    assert run.read_json("status.json")["state"] == "complete" and run.read_json("status.json")[FLOW_RUN] == flow_run_id


def test_runs_and_compare_show_each_runs_training_loss(tmp_path):
    """A nightly's first question after its scores: did training go as usual? `smolflow runs` and
    `compare` show the train and eval loss (none for an eval run)."""
    from tasks.run_table import compare_runs

    root = ArtifactStore(str(tmp_path))
    for run_id, metrics in (("n1", {"train_loss": 1.73402, "eval_loss": 1.84239, "steps": 30.0}), ("e1", None)):
        run = root.child("runs", run_id)
        run.write_json("config.json", {"gate": {"rescore_promoted": True}} if metrics else {})
        if metrics:
            run.write_json("training/metrics.json", metrics)
    rows = {r["run_id"]: r for r in list_runs(str(tmp_path))}
    assert rows["n1"]["losses"] == {"train_loss": 1.734, "eval_loss": 1.8424} and rows["e1"]["losses"] == {}
    assert compare_runs(str(tmp_path), "n1", "e1")["training"] == {"a": {"train_loss": 1.734, "eval_loss": 1.8424},
                                                                  "b": {}}
    # A setting one run's config.json lacks (an older smolflow's) is said so, not shown as None.
    assert compare_runs(str(tmp_path), "n1", "e1")["settings"] == [
        {"setting": "gate.rescore_promoted", "a": True, "b": "(not in its config.json)", "differs": True}]
    # judge.max_new_tokens None means sampling.max_new_tokens; an older config.json stored it resolved.
    for run_id, judged in (("n1", 8), ("n2", None), ("n3", None)):
        root.child("runs", run_id).write_json("config.json", {"judge": {"max_new_tokens": judged},
                                                              "sampling": {"max_new_tokens": 16 if run_id == "n3" else 8}})
    assert compare_runs(str(tmp_path), "n1", "n2")["settings"] == [
        {"setting": "judge.max_new_tokens", "a": 8, "b": "None (= sampling.max_new_tokens 8)", "differs": False},
        {"setting": "sampling.max_new_tokens", "a": 8, "b": 8, "differs": False}]
    assert [s["differs"] for s in compare_runs(str(tmp_path), "n1", "n3")["settings"]] == [True, True]
    root.child("runs", "n1").write_json("status.json", {"state": "complete",
                                                        "started_at": "2026-12-07T18:12:26.921298+00:00"})
    # Which nights were promoted, and why the others were not: the promoted run now, one promoted
    # before it, one its gate rejected; an eval run (e1) has no gate.
    from tasks.pointers import set_pointer

    for run_id, promote, reasons in (("n1", True, []), ("n2", True, []), ("n3", False, ["gsm8k: 0.2 < 0.3 - 0.05"])):
        root.child("runs", run_id).write_json("gate/decision.json", {"promote": promote, "reasons": reasons})
    root.child("runs", "n2").write_json("manifest.json", {"run_id": "n2"})  # a pointer names a complete run
    set_pointer(str(tmp_path), "smolflow-finetune", "promoted", "n2")
    assert {r["run_id"]: (r["promoted"], r["gate"]) for r in list_runs(str(tmp_path))} == {
        "e1": (False, None), "n1": (False, {"promote": True, "reasons": []}),
        "n2": (True, {"promote": True, "reasons": []}), "n3": (False, {"promote": False, "reasons": reasons})}
    assert compare_runs(str(tmp_path), "n3", "n2")["promoted"] == {
        "a": {"promoted": False, "by_hand": None, "gate": {"promote": False, "reasons": reasons}},
        "b": {"promoted": True, "by_hand": None, "gate": {"promote": True, "reasons": []}}}
    shown = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "runs", "--root", str(tmp_path)],
                           capture_output=True, text=True, timeout=120).stdout
    assert "loss (train/eval)" in shown and "1.7340/1.8424" in shown, shown  # 4 decimals, as the scores
    assert " 2026-12-07 18:12:26 UTC " in shown, shown  # not the ISO string with its microseconds
    column = shown.splitlines()[0].index("promoted")
    promoted = {line.split()[0]: line[column:].split("  ")[0] for line in shown.splitlines()[2:]}
    assert promoted == {"e1": "", "n1": "yes", "n2": "yes (now)", "n3": "no: gsm8k: 0.2 < 0.3 - 0.05"}, shown


def test_compare_says_when_two_eval_losses_were_measured_on_other_rows_or_another_template(tmp_path):
    """`compare` put two nights' eval losses side by side whatever they were measured on: on other test
    rows, through another template or cut at another max_length they are other measures. The test
    rows are compared by their content (datasets' fingerprint differs for the same files in another
    checkout)."""
    from tasks.run_table import compare_runs

    root = ArtifactStore(str(tmp_path))
    for run_id, digest, fingerprint, length in (("n1", "d1", "f1", 512), ("n2", "d1", "f2", 512),
                                                ("n3", "d2", "f2", 512), ("n4", "d1", "f1", 256)):
        run = root.child("runs", run_id)
        run.write_json("config.json", {"training": {"max_length": length}, "template": {"chat_template": "model"}})
        run.write_json("training/metrics.json", {"train_loss": 1.5, "eval_loss": 1.6})
        run.write_json("manifest.json", {"dataset": {"source": "x", "fingerprint": fingerprint, "test_digest": digest}})
    apart = {b: compare_runs(str(tmp_path), "n1", b)["training"]["eval_loss_apart"] for b in ("n2", "n3", "n4")}
    assert apart == {"n2": [], "n3": ["test rows"], "n4": ["training.max_length"]}, apart
    shown = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "compare", "n1", "n3", "--root",
                            str(tmp_path)], capture_output=True, text=True, timeout=120).stdout
    assert "Training loss (train/eval): A 1.5000/1.6000 · B 1.5000/1.6000 (eval losses not comparable: test rows " \
           "differ)\n" in shown, shown
    # `smolflow runs` lists them as a column: a mark per way when the runs listed hold more than one.
    measured = {r["run_id"]: r["eval_loss_measured"] for r in list_runs(str(tmp_path))}
    assert measured["n1"] == measured["n2"] and len(set(measured.values())) == 3, measured
    listed = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "runs", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=120).stdout
    marks = {line.split()[0]: line.split("1.5000/1.6000 ")[1][:3] for line in listed.splitlines()[2:6]}
    assert marks == {"n1": "[a]", "n2": "[a]", "n3": "[b]", "n4": "[c]"}, listed
    assert "\neval losses marked [a], [b], [c] were measured on other test rows, template or training.max_length" \
        in listed, listed
    # A run from before the test rows' digest was recorded: its rows are named by datasets' fingerprint,
    # and so are every other run's beside it (a digest never equals a fingerprint).
    old = root.child("runs", "n0")
    old.write_json("config.json", {"training": {"max_length": 512}, "template": {"chat_template": "model"}})
    old.write_json("training/metrics.json", {"train_loss": 1.5, "eval_loss": 1.6})
    old.write_json("manifest.json", {"dataset": {"source": "x", "fingerprint": "f1"}})
    assert compare_runs(str(tmp_path), "n0", "n1")["training"]["eval_loss_apart"] == []
    assert compare_runs(str(tmp_path), "n0", "n2")["training"]["eval_loss_apart"] == ["test rows"]
    measured = {r["run_id"]: r["eval_loss_measured"] for r in list_runs(str(tmp_path))}
    assert measured["n0"] == measured["n1"] != measured["n2"] == measured["n3"], measured


def test_runs_name_a_benchmark_measured_two_ways_by_its_ways(tmp_path):
    """MMLU went from cloze to lettered between two nights: `smolflow runs` showed mmlu=0.5833 beside
    mmlu=0.0833 as one measure. Now a column per way, named as the score trend names its series."""
    root = ArtifactStore(str(tmp_path))
    for run_id, fmt, score in (("n1", "cloze", 0.5833), ("n2", "mcq", 0.0833), ("n3", "mcq", 0.1667)):
        run = root.child("runs", run_id)
        run.write_json("config.json", {})
        run.write_json("benchmarks/comparison.json", [{"benchmark": "mmlu", "tuned": score},
                                                      {"benchmark": "gsm8k", "tuned": 0.3}])
        parts = {"benchmark": "mmlu", "n": 12, "format": fmt, "scorer": f"{fmt} scorer"}
        run.write_json("benchmarks/mmlu/tuned.summary.json", {"name": "mmlu", "score": score, "comparability": parts,
                                                              "comparability_key": f"key-{fmt}",
                                                              "provenance": {"note": "fixture"}})
        run.write_json("benchmarks/gsm8k/tuned.summary.json", {"name": "gsm8k", "score": 0.3, "comparability_key": "k"})
    rows = {r["run_id"]: r for r in list_runs(str(tmp_path))}
    assert [rows[r]["scores"] for r in ("n1", "n2", "n3")] == [
        {"mmlu [cloze]": 0.5833, "gsm8k": 0.3}, {"mmlu [mcq]": 0.0833, "gsm8k": 0.3}, {"mmlu [mcq]": 0.1667, "gsm8k": 0.3}]
    assert rows["n1"]["sources"]["mmlu [cloze]"] == "fixture"
    shown = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "runs", "--root", str(tmp_path)],
                           capture_output=True, text=True, timeout=120).stdout
    assert "mmlu [cloze]=0.5833 gsm8k=0.3000" in shown and "mmlu [mcq]=0.0833 gsm8k=0.3000" in shown, shown


def test_run_timeout_reads_hours_and_refuses_nonsense(monkeypatch):
    from tasks.runtime import RUN_TIMEOUT_ENV, run_timeout

    import signal

    from tasks.runtime import MAX_TIMEOUT_HOURS

    for value, seconds in (("", None), ("0", None), ("0.0", None), ("none", None), ("23", 23 * 3600), ("0.5", 1800),
                           (str(MAX_TIMEOUT_HOURS), MAX_TIMEOUT_HOURS * 3600)):
        monkeypatch.setenv(RUN_TIMEOUT_ENV, value)
        assert run_timeout() == seconds
    # the largest fits the timer Prefect's flow timeout sets (inf and 1e300 overflowed it in every run)
    signal.setitimer(signal.ITIMER_REAL, MAX_TIMEOUT_HOURS * 3600)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for bad in ("abc", "-1", "inf", "nan", "1e300"):
        monkeypatch.setenv(RUN_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=RUN_TIMEOUT_ENV):
            run_timeout()


def test_served_runs_get_a_timeout_unless_told_otherwise(monkeypatch):
    from deployments.serve import default_run_timeout
    from tasks.runtime import RUN_TIMEOUT_ENV

    monkeypatch.setenv(RUN_TIMEOUT_ENV, "")  # recorded, so that the value set below is undone
    monkeypatch.delenv(RUN_TIMEOUT_ENV)
    default_run_timeout()
    assert os.environ[RUN_TIMEOUT_ENV] == "23"
    monkeypatch.setenv(RUN_TIMEOUT_ENV, "0")  # the operator's choice stays
    default_run_timeout()
    assert os.environ[RUN_TIMEOUT_ENV] == "0"


def test_serve_with_a_bad_timeout_says_so_in_one_line_before_starting_anything(tmp_path):
    """`smolflow serve` checks SMOLFLOW_RUN_TIMEOUT_HOURS before its server starts (the flows read it
    at import, where it was a traceback after the server was up)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"SMOLFLOW_RUN_TIMEOUT_HOURS": "abc", "PREFECT_HOME": str(tmp_path / "home")}
    start = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "serve", "--port", str(port),
                          "--startup-timeout", "60"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: SMOLFLOW_RUN_TIMEOUT_HOURS='abc' is not a number of hours; set e.g. 23, or 0 for no limit"]
    assert "Prefect UI" not in out.stdout and time.monotonic() - start < 30
    assert not (tmp_path / "home").exists()  # no server, no database


@pytest.mark.slow
def test_a_run_over_its_time_ends_timed_out_and_says_so(tiny_model_dir, tmp_path):
    """A hung nightly would hold its deployment's slot for good: past SMOLFLOW_RUN_TIMEOUT_HOURS the
    flow run ends (TimedOut, which the failed-run alert covers) and its folder says why."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import tiny_run_config

    config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), output={"run_id": "too-long"},
                             judge={"enabled": False}, training={"max_steps": 100000, "eval_steps": 200000,
                                                                 "save_steps": 200000})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT),
                        "SMOLFLOW_RUN_TIMEOUT_HOURS": "0.003"}  # 10.8 s
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "run.yaml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and time.monotonic() - started < 300, out.stderr[-3000:]
    assert "FlowRunTimeoutError" in out.stderr  # the CLI's one error line
    status = json.loads((tmp_path / "artifacts/runs/too-long/status.json").read_text())
    assert status == status | {"state": "failed", "why": "timed out: the run took longer than SMOLFLOW_RUN_TIMEOUT_HOURS=0.003 h"}


def test_compare_two_runs_item_by_item_and_says_why_scores_are_not_comparable(tmp_path):
    """`smolflow compare`: two runs on the same items compare item by item (as the gate does); scores
    measured differently get the reason, not a `beyond_noise: False`; both runs' sources are shown."""
    from tasks.layout import RunPaths
    from tasks.run_table import compare_runs

    root = ArtifactStore(str(tmp_path))
    for run_id, correct, key, n in (("a", [i < 60 for i in range(100)], "k1", 100),
                                    ("b", [i < 50 for i in range(100)], "k1", 100),
                                    ("c", [i < 5 for i in range(10)], "k2", 10)):
        run = root.child("runs", run_id)
        run.write_json("config.json", {})
        run.write_json(RunPaths.comparison, [{"benchmark": "mmlu", "tuned": sum(correct) / n}])
        run.write_json(RunPaths.benchmark_summary("mmlu", "tuned"), {
            "name": "mmlu", "score": sum(correct) / n, "stderr": 0.05, "n": n, "comparability_key": key,
            "comparability": {"n": n, "data": "d"}, "provenance": {"note": f"{n} fixture items"}})
        run.write_text(RunPaths.benchmark_records("mmlu", "tuned"),
                       "".join(json.dumps({"doc_id": i, "correct": c}) + "\n" for i, c in enumerate(correct)))
    (same,) = compare_runs(str(tmp_path), "a", "b")["scores"]
    assert (same["delta"], same["stderr"], same["beyond_noise"]) == (-0.1, 0.0302, True)  # independent: 0.0707, False
    assert same["source"] == "100 fixture items"
    (apart,) = compare_runs(str(tmp_path), "a", "c")["scores"]
    assert apart["delta"] == "not comparable (n 100 vs 10)" and apart["beyond_noise"] == "n/a"
    assert apart["source"] == "A: 100 fixture items; B: 10 fixture items"


def test_compare_shows_one_benchmarks_changed_setting_and_a_benchmark_one_run_lacks(tmp_path):
    """Adding MMLU to a nightly showed the whole benchmarks list twice, on one 300-character row, and
    its score as `None`; the data as two dict reprs. Now a benchmark's settings are rows by its name
    (order does not count), a benchmark one run lacks is one row, its missing score `-` and its source
    that of the run that scored it; the same data is said once."""
    from tasks.layout import RunPaths
    from tasks.run_table import compare_runs

    root = ArtifactStore(str(tmp_path))
    gsm8k = {"name": "gsm8k", "limit": 10, "num_fewshot": None}
    for run_id, benchmarks in (("a", [gsm8k]), ("b", [{"name": "mmlu", "limit": 20, "num_fewshot": None},
                                                      gsm8k | {"limit": 20}])):
        run = root.child("runs", run_id)
        run.write_json("config.json", {"benchmarks": benchmarks, "training": {"learning_rate": 5e-5}})
        run.write_json("manifest.json", {"dataset": {"source": "fixture:x", "fingerprint": "f" * 64,
                                                     "rows": {"train": 64, "test": 12}}})
        run.write_json(RunPaths.comparison, [{"benchmark": b["name"], "tuned": 0.5} for b in benchmarks])
        for b in benchmarks:
            run.write_json(RunPaths.benchmark_summary(b["name"], "tuned"), {
                "name": b["name"], "score": 0.5, "n": b["limit"], "comparability_key": b["name"],
                "provenance": {"note": f"{b['name']} fixture"}})
    result = compare_runs(str(tmp_path), "a", "b")
    assert [s for s in result["settings"] if s["differs"]] == [
        {"setting": "benchmarks[gsm8k].limit", "a": 10, "b": 20, "differs": True},
        {"setting": "benchmarks[mmlu]", "a": "(not in its benchmarks)", "b": {"limit": 20}, "differs": True}]
    assert [s["setting"] for s in result["settings"]] == ["benchmarks[gsm8k].limit", "benchmarks[gsm8k].num_fewshot",
                                                          "benchmarks[mmlu]", "training.learning_rate"]
    mmlu = next(r for r in result["scores"] if r["benchmark"] == "mmlu")
    assert (mmlu["a"], mmlu["source"]) == (None, "B: mmlu fixture"), mmlu
    shown = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "compare", "a", "b", "--root",
                            str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert next(line for line in lines if line.startswith("mmlu")).split()[:3] == ["mmlu", "-", "0.5"], shown.stdout
    assert "None" not in shown.stdout and "{'source'" not in shown.stdout, shown.stdout
    assert "Data: fixture:x · rows 64 train / 12 test · fingerprint ffffffffffff (both)" in lines, shown.stdout


def test_a_run_that_catches_prefects_timeout_is_ended_again(tmp_path, monkeypatch):
    """Prefect raises its flow timeout once, where the flow's code happens to be: code that catches it
    there (a library's `except asyncio.CancelledError`) let a run train on for good (CI: a 10.8 s limit,
    still training at 10 min, then killed holding the test server's training slot: CI hung)."""
    from prefect import flow

    from tasks import run_ending
    from tasks.runtime import RUN_TIMEOUT_ENV

    monkeypatch.setenv(RUN_TIMEOUT_ENV, "0.0003")  # what the status says; the flow below has its 1 s
    monkeypatch.setattr(run_ending, "GRACE_S", 0.5)
    monkeypatch.setattr(run_ending, "AGAIN_S", 0.5)
    caught = []

    @flow(timeout_seconds=1)
    def swallows_its_timeout(uri: str) -> str:
        def work() -> None:  # in Python, as a training loop is
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                sum(range(1000))

        with status_recorded(ArtifactStore(uri)):
            for _ in range(2):  # caught where it lands, twice (Prefect's, then the first one again)
                try:
                    work()
                except BaseException as err:  # noqa: BLE001 - what a library did
                    caught.append(type(err).__name__)
            work()  # the next one ends the run
            return "went on for good"

    started = time.monotonic()
    state = swallows_its_timeout(str(tmp_path), return_state=True)
    assert state.name == "TimedOut" and time.monotonic() - started < 30, (state, caught)
    assert caught == ["CancelledError", "CancelledError"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["why"].startswith("timed out: the run took longer than"), status


def test_a_run_that_catches_its_sigterm_is_stopped_again(tmp_path):
    """A cancel in Prefect, or a stop, is one SIGTERM: Prefect's TerminationSignal, raised once where
    the code is. Caught there, the run went on; the SIGTERM test then killed it holding the test
    server's training slot (seen under load in CI). Raised again 30 s later, it raced Prefect's
    runner, which SIGKILLs a cancelled run 30 s after its SIGTERM: a cancel caught as training began
    (W&B's callbacks) left status.json 'running' (CI). With the real grace, well before that."""
    from prefect import flow

    caught = []

    @flow
    def swallows_its_stop(uri: str) -> str:
        def work() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                sum(range(1000))

        with status_recorded(ArtifactStore(uri)):
            for attempt in range(2):
                try:
                    if attempt == 0:
                        os.kill(os.getpid(), signal.SIGTERM)  # what a cancel in Prefect sends
                    work()
                except BaseException as err:  # noqa: BLE001 - what a library did
                    caught.append(type(err).__name__)
            work()
            return "went on for good"

    resent = []  # Prefect sends the SIGTERM again to the handler it found once the flow has ended
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: resent.append(signum))
    try:
        started = time.monotonic()
        with pytest.raises(TerminationSignal):
            swallows_its_stop(str(tmp_path))
        assert time.monotonic() - started < 20 and caught == ["TerminationSignal", "StopSignal"], caught
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["state"] == "stopped" and status["why"].startswith("stopped by SIGTERM"), status
    finally:
        signal.signal(signal.SIGTERM, before)
