"""Run smolflow's deployments on this machine: a Prefect server (offline, SQLite) plus the
process that executes them.

    python -m deployments.local [--port 4200]      # or: make serve

prints the UI address and keeps both running until Ctrl-C. To use an existing server or Prefect
Cloud instead, skip this and run `PREFECT_API_URL=... python -m deployments.serve`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    return env


def start_server(port: int, home: Path | None = None, log: Path | None = None, timeout: float = 120) -> subprocess.Popen:
    """Start `prefect server start` on 127.0.0.1:port and wait until its API is healthy."""
    prefect = Path(sys.executable).parent / "prefect"
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env(port, home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"prefect server on port {port} not healthy after {timeout:.0f} s")


def start_serving(port: int, home: Path | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start deployments/serve.py against the server on `port`."""
    out = open(log, "ab") if log else None
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.serve"],
        cwd=ROOT, env=server_env(port, home), stdout=out, stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    server = start_server(args.port)
    print(f"Prefect UI: http://127.0.0.1:{args.port}  (API: http://127.0.0.1:{args.port}/api)", flush=True)
    serving = start_serving(args.port)
    try:
        serving.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(serving)
        stop(server)


if __name__ == "__main__":
    main()
