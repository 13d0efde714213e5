"""One training at a time: two runs started together, as two real processes, never train at once.
Without a server a file lock serialises them; with a shared Prefect server its global concurrency
limit does, even across machines (here: two processes with separate caches, so separate locks).
Slow (each case starts two processes that import torch and TRL; ~350 s per case measured here
under a load of ~13 on 2 cores): the only way to show two real runs do not overlap."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

ROOT = Path(__file__).resolve().parents[1]

# Both processes wait at a barrier, then train; a callback records when the Trainer starts and
# ends, and sleeps a little per step so that two unserialised trainings would surely overlap.
TRAIN = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from tasks import training
from tasks.config import DataConfig, TrainingConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.tokenization import tokenized_splits

model, run_uri, barrier, me = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
phases = Path(run_uri) / "phase.json"

class Record(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.begin = time.time()
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.3)
    def on_train_end(self, args, state, control, **kw):
        phases.parent.mkdir(parents=True, exist_ok=True)
        phases.write_text(json.dumps({"begin": self.begin, "end": time.time()}))

training.training_progress = Record
ref = resolve_model.fn(model)
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
cfg = TrainingConfig(max_steps=6, save_steps=100, logging_steps=1, eval_steps=100, max_length=64)
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.02)
training.train_sft.fn(ref, tokenized_splits(ref, data, cfg.max_length), cfg, run_uri, [])
"""


@pytest.mark.parametrize("shared", ["file-lock", "prefect-server"])
@pytest.mark.slow
def test_two_runs_started_together_never_train_at_once(shared, tiny_model_dir, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONPATH": str(ROOT)}
    procs = []
    for name in ("a", "b"):
        run_env = dict(env)
        if shared == "prefect-server":
            # Two "machines": own caches (so own file locks), one Prefect server between them.
            run_env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "SMOLFLOW_CACHE": str(tmp_path / f"cache-{name}"),
                        "SMOLFLOW_MACHINE_LOCK": f"machine-{name}"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(tiny_model_dir), str(tmp_path / "runs" / name), str(barrier), name],
            cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    a, b = sorted((json.loads((tmp_path / "runs" / n / "phase.json").read_text()) for n in "ab"),
                  key=lambda p: p["begin"])
    assert a["end"] <= b["begin"], f"training phases overlap: {a} and {b}"


# Takes the training lock with a cache of its own and no Prefect server, records when it held it;
# holds it for argv[2] seconds, or until the file argv[3] exists.
HOLD = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tasks.locks import TRAINING_LOCK, exclusive
with exclusive(TRAINING_LOCK, sys.argv[1]) as how:
    begin = time.time()
    print(json.dumps(how), flush=True)
    until = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < until and not (len(sys.argv) > 3 and os.path.exists(sys.argv[3])):
        time.sleep(0.05)
    print(json.dumps({"begin": begin, "end": time.time()}), flush=True)
"""


def test_runs_with_caches_of_their_own_take_turns_and_a_killed_holder_frees_the_machine(tmp_path):
    """Two users (or two SMOLFLOW_CACHE folders) on one machine, no Prefect server: their file locks
    are their own, so before the machine-wide lock they trained at once, each ~10x slower on shared
    cores. And a holder killed by SIGKILL (the out-of-memory killer) frees it at once."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONPATH": str(ROOT)}

    def hold(who: str, seconds: float, *until: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLD, who, str(seconds), *map(str, until)], cwd=ROOT,
                                text=True, env=env | {"SMOLFLOW_CACHE": str(tmp_path / f"cache-{who}")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # The first holds it until the second says it waits (a fixed hold ran out under CI's load while
    # the second was still starting, and it then found the lock free).
    release = tmp_path / "release"
    first = hold("first", 120, release)
    how = json.loads(first.stdout.readline())  # it holds the lock now
    assert how["machine"] == f"{os.environ['SMOLFLOW_MACHINE_LOCK']}/smolflow-training", how
    second, said = hold("second", 0), []
    for line in second.stderr:  # until it waits (or, if it never says so, until it ends)
        said.append(line)
        if "held by another smolflow process on this machine" in line:
            break
    release.touch()
    outs = [proc.communicate(timeout=120) for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0], outs
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert a["end"] <= b["begin"], f"they held it at once: {a} and {b}"
    assert "held by another smolflow process on this machine" in said[-1], "".join(said)[-2000:]
    assert b["begin"] - a["end"] < 10, (a, b)  # taken as soon as it was given back
    # SIGKILLed while holding it: the kernel unbinds its socket, and the next one takes it at once.
    killed = hold("killed", 300)
    json.loads(killed.stdout.readline())
    killed.kill()
    killed.wait()
    start = time.monotonic()
    after = hold("after", 0)
    out, err = after.communicate(timeout=120)
    assert after.returncode == 0 and time.monotonic() - start < 30, err[-2000:]
    assert "held by another" not in err, err[-2000:]
    killed.stdout.close()
    killed.stderr.close()


def test_the_server_slot_is_taken_inside_and_given_back_after_an_error(tmp_path, monkeypatch):
    """exclusive() on the Prefect server: its limit's one slot is taken inside the block and given
    back when the block ends, an exception included (released, not left for the lease to expire)."""
    from prefect.client.orchestration import get_client

    from tasks.locks import exclusive

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path))
    name = "smolflow-test-slot"

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    assert PREFECT_API_URL.value()
    with pytest.raises(RuntimeError, match="inside"), exclusive(name, "test") as how:
        assert how["prefect_api"] == PREFECT_API_URL.value() and active() == 1
        raise RuntimeError("inside")
    assert active() == 0
    with exclusive(name, "test"):  # and taken again at once
        assert active() == 1
    assert active() == 0


def test_the_slot_is_given_back_when_a_stop_lands_in_the_request(tmp_path, monkeypatch):
    """tasks/run_ending.py raises a run's timeout or stop again into its thread until the run ends:
    one that lands while the slot is being given back must not leave it taken (on a server without
    lease expiry, the test server's, every later training waited for good). It comes after."""
    import threading

    from prefect.client.orchestration import get_client

    from tasks import locks
    from tasks.run_ending import _raise_in

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path))
    name, real, cut, waiting = "smolflow-test-give-back", locks._post, [], threading.get_ident()

    def post(path, *args, **kwargs):
        if path.endswith("/decrement-with-lease") and not cut:
            cut.append(path)
            _raise_in(waiting, KeyboardInterrupt)  # as run_ending raises it, into the thread that asked
            time.sleep(0.5)  # it lands while the request is under way
        return real(path, *args, **kwargs)

    monkeypatch.setattr(locks, "_post", post)
    with pytest.raises(KeyboardInterrupt), locks.exclusive(name, "test"):
        pass
    assert cut
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


# The server grants the slot, then SIGTERM (a cancel in Prefect) arrives before the process has
# read the lease id: the slot must still be given back when the process ends. And a cancel that
# comes then is one Prefect can acknowledge, as its control listener does (a thread of the flow
# process): only while Prefect's SIGTERM handler is the one installed.
SIGTERM_MID_TAKE = """
import os, signal, sys, threading
import httpx
from prefect.utilities.engine import capture_sigterm, commit_control_intent_and_ack
from tasks.leftovers import exit_on_termination
from tasks.locks import exclusive

send, acked = httpx.Client.send, []
def send_then_sigterm(self, request, **kw):
    response = send(self, request, **kw)
    if request.url.path.endswith("/increment-with-lease"):
        acked.append(commit_control_intent_and_ack(commit_intent=lambda: None, clear_intent=lambda: None,
                                                   send_ack=lambda: None))
        os.kill(os.getpid(), signal.SIGTERM)
    return response
httpx.Client.send = send_then_sigterm
exit_on_termination()
threading.Thread(target=threading.Event().wait, daemon=True).start()  # a flow process has threads
try:
    with capture_sigterm(), exclusive(sys.argv[1], "test"):  # as in a flow run
        sys.exit("the SIGTERM did not end it")  # exit status 1, not 143
finally:
    print("cancel acknowledged:", acked, flush=True)
"""


def test_a_sigterm_while_the_server_slot_is_taken_gives_it_back(tmp_path):
    """Cancelled in the moment the server grants the slot: without care the lease id is lost with
    the request, and the slot stays taken until its lease expires (LEASE_S, 5 min): the next run
    waited that long after a cancel. And the cancel is acknowledged: the answer was kept with the
    stop signals' handlers swapped for ones that noted them, and a cancel in Prefect that came then
    was refused (Prefect acknowledges one only under its own handler): the run ended Crashed."""
    from prefect.client.orchestration import get_client

    name = "smolflow-test-sigterm"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(), "SMOLFLOW_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MID_TAKE, name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]  # ended by the SIGTERM, not after the sleep
    assert "cancel acknowledged: [True]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


# Takes the slot on Prefect's shortest lease, then dies as the out-of-memory killer kills: nothing
# gives the slot back; only the server's lease expiry can.
HOLD_THEN_SIGKILL = """
import os, signal, sys
from tasks import locks
locks.LEASE_S = 60  # the shortest lease Prefect grants
with locks.exclusive(sys.argv[1], "test"):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_slot_whose_holder_was_sigkilled_is_freed_when_its_lease_expires(tmp_path):
    """The module's promise for a holder that dies (its docstring): an unrenewed lease expires and the
    server frees the slot, here on the tests' own server (tests/conftest.py: an ephemeral one never
    did, and a run a test killed stalled every later training of the session)."""
    import time

    from prefect.client.orchestration import get_client

    name = "smolflow-test-sigkill"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(), "SMOLFLOW_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", HOLD_THEN_SIGKILL, name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and proc.stdout == "held\n", proc.stderr[-3000:]
    killed = time.monotonic()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # left taken
        while (active := client.read_global_concurrency_limit_by_name(name).active_slots) and \
                time.monotonic() - killed < 150:
            time.sleep(2)
    assert active == 0, "the slot of a SIGKILLed holder was never freed (60 s lease)"
