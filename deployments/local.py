"""Run smolflow's deployments on this machine: a Prefect server (offline, SQLite) plus the
process that executes them.

    python -m deployments.local [--port 4200] [--config FILE] [settings ...]   # or: make serve

prints the UI address and keeps both running until Ctrl-C, SIGTERM or SIGHUP, which stop every
child (and their children) before this process exits; a busy port is an error (exit 2), never an
attachment to a server that is already there. To use an existing server or Prefect Cloud instead,
skip this and run `PREFECT_API_URL=... python -m deployments.serve`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deployments.server_log import LOG_NAME, cap_log, log_tail, server_log
from tasks.config_args import UserError, locate, port_number, seconds, serve_config
from tasks.leftovers import alive, descendants  # noqa: F401 (descendants: tests use it from here)
from tasks.parent_death import die_with_parent
from tasks.runtime import env_defaults, run_timeout, shadowing

ROOT = Path(__file__).resolve().parent.parent
PORT_IN_USE = 2  # exit status when the port is taken
# -P: these processes run in the user's folder (served runs write ./smolflow-runs there); Python
# would otherwise import a `tasks` or `flows` package found there instead of smolflow's.
PYTHON = [sys.executable, "-P"]


def folder_problem(folder: Path | None = None) -> str | None:
    """Why served runs cannot run in `folder` (default: this one), or None. Prefect's flow-run
    process imports the flow with the folder first on sys.path (prefect.utilities.importtools), so
    a `flows` or `tasks` package or module of the user's there would be imported instead of
    smolflow's, and every run would crash."""
    if (found := shadowing(folder)) is None:
        return None
    name = found.parent.name if found.name == "__init__.py" else found.stem
    return (f"{found} would be imported instead of smolflow's own '{name}' in every served run: "
            "served runs run in the folder `smolflow serve` starts in, and Prefect imports flows from "
            "there. Start it from another folder, e.g. one for the runs: "
            "mkdir -p ~/smolflow && cd ~/smolflow && smolflow serve")


CRON_ENV, TIMEZONE_ENV = "SMOLFLOW_NIGHTLY_CRON", "SMOLFLOW_TIMEZONE"


def nightly_schedule():
    """The nightly's schedule: SMOLFLOW_NIGHTLY_CRON (default 0 2 * * *) in SMOLFLOW_TIMEZONE (default
    UTC). A bad value is a ValueError naming the variable, raised before the server starts (Prefect's
    own check would otherwise end the serve process in a traceback, with the server already up)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    cron, zone = os.environ.get(CRON_ENV, "0 2 * * *"), os.environ.get(TIMEZONE_ENV, "UTC")
    try:
        return CronSchedule(cron=cron, timezone=zone)
    except ValidationError as err:
        if any(e["loc"] == ("timezone",) for e in err.errors()):
            raise ValueError(f"{TIMEZONE_ENV}={zone!r} is not an IANA time zone; set e.g. UTC, "
                             "Europe/Berlin or America/New_York") from None
        raise ValueError(f"{CRON_ENV}={cron!r} is not a cron schedule; set five fields (minute hour "
                         "day-of-month month day-of-week), e.g. '0 2 * * *' for 02:00 every day") from None


def next_nightly(schedule) -> str:
    """When the nightly runs next, in its time zone (Prefect's own cron arithmetic, the scheduler's)."""
    import asyncio
    import inspect

    from prefect.server.schemas.schedules import CronSchedule

    dates = CronSchedule(cron=schedule.cron, timezone=schedule.timezone).get_dates(n=1)
    (when,) = asyncio.run(dates) if inspect.isawaitable(dates) else dates  # sync or async, as Prefect decides
    return when.strftime("%Y-%m-%d %H:%M %Z")


class PortInUseError(RuntimeError):
    """Something already listens on the port: never attach to someone else's server."""


def check_port_free(port: int) -> None:
    """Raise PortInUseError if 127.0.0.1:port cannot be bound."""
    with socket.socket() as s:
        # As servers do: connections of a stopped server in TIME_WAIT must not count, a listener must.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            raise PortInUseError(
                f"port {port} on 127.0.0.1 is already in use ({err.strerror}): another Prefect server or program is "
                f"listening there. Stop it, or pick a free port: make serve ARGS='--port {port + 1}'"
            ) from None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (a graceful stop) when the parent dies, even by SIGKILL."""
    die_with_parent(sig=signal.SIGTERM)


def reap(procs: dict[int, str], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL, whichever of these processes (same pid and start time) still live."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive(procs):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout / 2
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def server_env(port: int, home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The UI must be told where its API is when the port is not 4200.
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    # A deployment's concurrency slot is held under a lease that its run renews. Prefect keeps
    # leases in memory by default: a server restarted after its runner died (kill -9, a reboot)
    # had lost the lease but not the slot, so the deployment never ran again. On disk (PREFECT_HOME)
    # the lease survives the restart and expires, and the server frees the slot.
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    return env


def start_server(port: int, home: Path | None = None, log: Path | None = None, timeout: float = 120,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `prefect server start` on 127.0.0.1:port (deployments/prefect_server.py: no webhook URL in
    its log) and wait until its API is healthy. `env`: more variables for it (Prefect settings)."""
    check_port_free(port)
    out = open(log, "ab") if log else subprocess.DEVNULL
    env = server_env(port, home) | (env or {})
    if (ROOT / "pyproject.toml").exists():  # a checkout: its code, whether or not it is installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(  # `-m`: a `pip install --user` puts the `prefect` script elsewhere than the interpreter
        [*PYTHON, "-m", "deployments.prefect_server", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _stop_if_asked()
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before answering"
                               + (f"; its log: {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200 and proc.poll() is None:  # answered by our server, not another one
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"the Prefect server on port {port} did not answer within {timeout:.0f} s; give it longer "
                       "with --startup-timeout SECONDS" + (f"; its log: {log}" if log else ""))


def start_serving(port: int, home: Path | None = None, log: Path | None = None,
                  cwd: Path | None = None, settings: list[str] = ()) -> subprocess.Popen:
    """Start deployments/serve.py against the server on `port`, in `cwd` (default: this process's
    folder): its flow runs run there, so a relative `output.artifacts_uri` (the default
    ./smolflow-runs) is where `smolflow serve` was started, as for `smolflow run` and `smolflow runs`.
    `settings` ([--config FILE] [--section.field VALUE ...]): the fine-tune deployments' parameters."""
    out = open(log, "ab") if log else None
    env = server_env(port, home)
    if (ROOT / "pyproject.toml").exists():  # a checkout: its code, whether or not it is installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [*PYTHON, "-m", "deployments.serve", *settings],
        cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
        start_new_session=True, preexec_fn=_die_with_parent,
    )


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server or serve process and its children (a served run needs SIGINT after SIGTERM)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            continue


def _ended(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"code {code}"


def watch(server: subprocess.Popen, serving: subprocess.Popen, log: Path, every: float = 1.0) -> int:
    """Wait until either child ends; this process's exit status. A server that dies is said at once
    (with the end of its log when it exited on an error) and ends everything with status 1, for a
    restart policy: a runner left beside it retried the API for ~4 minutes in silence, then died in
    a 200-line traceback. A serve process that ends by itself: its status (signal N: 128+N, as shells say)."""
    while True:
        _stop_if_asked()
        if (code := server.poll()) is not None:
            print(f"error: the Prefect server exited ({_ended(code)}); stopping the deployments. Its log: {log}",
                  file=sys.stderr)
            if code > 0:  # it said why; one killed by a signal (OOM, kill -9) did not, and its tail is its banner
                print(log_tail(log), end="", file=sys.stderr)
            sys.stderr.flush()
            return 1
        if (code := serving.poll()) is not None:
            try:  # its runner dies of a killed server (the API gone) before that server is reapable
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return 128 - code if code < 0 else code
            continue  # the server ended too: said above, as the cause
        cap_log(log)
        time.sleep(every)


def check_settings(settings: list[str]) -> None:
    """What `smolflow run` checks before its flow (flows/cli.py cmd_run), on the config the served
    fine-tunes will get: a missing data file, model or benchmark file is one line now, not a failed
    nightly every night. Raises UserError/ValueError (ConfigError) or StorageError."""
    from tasks.checks import check_inputs, check_run
    from tasks.config import RunConfig
    from tasks.console import configure_logging

    finetuning, _ = serve_config(settings)
    config = RunConfig.model_validate(finetuning["config"])  # as the deployment's runs validate it
    configure_logging()  # the checks read the data: quiet unless --verbose, as `smolflow run`
    # Not what `run` also asks of the network (the hub, the judge's endpoint, W&B): an outage while
    # serve (re)starts would keep every later nightly from running; each served run asks it itself.
    check_inputs(config)
    check_run(config)


def refuse_bad_input(settings: list[str]) -> None:
    """Exit 2 with one `error:` line if anything the operator gave would fail, before the server starts:
    the folder, the nightly's settings, then the environment the deployments read (the schedule's
    check imports Prefect), then, with settings given, what they name (the embedded defaults need no
    check, and serve's start stays fast)."""
    if problem := folder_problem():
        _refuse(problem)
    try:
        serve_config(settings)
        run_timeout()
        nightly_schedule()
    except ValueError as err:
        _refuse(str(err))
    if not settings:
        return
    from tasks.storage import StorageError  # imported by the checks anyway

    try:
        check_settings(settings)
    except (ValueError, FileNotFoundError, StorageError) as err:  # UserError, ConfigError: the message names the field
        _refuse(str(err) if isinstance(err, UserError) else locate(settings, str(err)))  # + where it was set


def _refuse(problem: str) -> None:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2: not argparse's usage line first
        _refuse(message)


# A stop asked for by a signal, kept where its exception is lost: a SIGTERM during the fork of a Popen
# with a preexec_fn runs the handler at the entry of logging's at-fork hook, whose exception the fork's
# C code prints and drops, and the supervisor then served on. Each wait below looks at it.
_stop_asked = False


def _stop_on_signal(signum, frame) -> None:
    global _stop_asked
    _stop_asked = True
    raise KeyboardInterrupt  # unwinds main() through its `finally`, which stops the children


def _stop_if_asked() -> None:
    """Raise the stop a fork dropped (`_stop_asked`)."""
    if _stop_asked:
        raise KeyboardInterrupt


def shutdown(server: subprocess.Popen | None, serving: subprocess.Popen | None) -> None:
    """Stop both children and every process under this one: the serve process first (its runner
    cancels a flow run in progress), then the server, then whatever of theirs is left."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    leftovers = descendants(os.getpid())  # flow runs start sessions of their own: track them by pid
    for proc in (serving, server):
        if proc is not None:
            stop(proc)
    reap(leftovers)


def supervise(port: int, startup_timeout: float, settings: list[str]) -> int:
    """Start the server and the serve process, keep them running, stop both; the exit status."""
    server = serving = log = None
    try:
        check_port_free(port)  # before the log is rotated: a second `smolflow serve` must not touch the first's
        log = server_log()
        print(f"Prefect server log: {log}", flush=True)
        server = start_server(port, log=log, timeout=startup_timeout)
        print(f"Prefect UI: http://127.0.0.1:{port}  (API: http://127.0.0.1:{port}/api)", flush=True)
        serving = start_serving(port, settings=settings)
        return watch(server, serving, log)  # which looks at `_stop_asked` too
    except PortInUseError as err:
        print(f"error: {err}", file=sys.stderr)
        return PORT_IN_USE
    except (RuntimeError, TimeoutError) as err:  # the server did not come up: say so and why, no traceback
        print(f"error: {err}", file=sys.stderr)
        print(log_tail(log), end="", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown(server, serving)
        if log is not None and log.name != LOG_NAME:  # the temp-folder fallback: shown above, not left behind
            log.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=port_number, default=4200,
                        help="port of the Prefect server and UI (default %(default)s); a busy port exits 2")
    parser.add_argument("--startup-timeout", type=seconds, default=300,
                        help="seconds to wait for the server to answer (its first start sets up the database)")
    args, settings = parser.parse_known_args(argv)  # the rest: the nightly's settings (deployments/serve.py)
    env_defaults()  # the server's flow-run vacuum among them, when started as `python -m deployments.local`
    try:
        refuse_bad_input(settings)
    except KeyboardInterrupt:  # Ctrl-C during the checks (seconds, with settings): nothing started yet
        sys.exit(130)
    # kill, systemd and docker send SIGTERM; a closed terminal SIGHUP: both stop like Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    sys.exit(supervise(args.port, args.startup_timeout, settings))


if __name__ == "__main__":
    main()
