"""scripts/s3_server.py as a command, with real processes and signals: nothing outlives it (weed,
its unix sockets in /tmp), and a busy port or data directory is one line, not a traceback."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.s3_server import weed_binary

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "s3_server.py"
PORT = 4380  # this file's S3 ports: 4380-4389 (each test its own, so xdist workers never collide)
FOREIGN_PORT = 4399  # a port of no server here


@pytest.fixture(autouse=True)
def _needs_weed() -> None:
    try:
        weed_binary()
    except RuntimeError as err:
        pytest.skip(str(err))


class Launched:
    """Scripts started by a test, the weeds they ran and their ports: all gone after the test."""

    def __init__(self) -> None:
        self.scripts: list[subprocess.Popen] = []
        self.data_dirs: set[Path] = set()
        self.weeds: set[int] = set()
        self.ports: set[int] = set()

    def start(self, data_dir: Path, port: int) -> tuple[subprocess.Popen, int]:
        """The script in its own session (as `setsid` would), once it serves; and its weed's pid."""
        self.data_dirs.add(data_dir.resolve())
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), "--data-dir", str(data_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.scripts.append(proc)
        out, deadline = b"", time.monotonic() + 60
        with selectors.DefaultSelector() as sel:  # raw reads: a buffered reader hides lines from select
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"Ctrl-C to stop." not in out:
                assert sel.select(max(0.0, deadline - time.monotonic())), f"not serving within 60 s:\n{out}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"the script exited ({proc.wait()}):\n{out.decode()}"
                out += chunk
        weed = int(re.search(rb"\(pid (\d+)\)", out).group(1))
        self.weeds.add(weed)
        self.ports |= weed_ports(weed)
        return proc, weed

    def cleanup(self) -> None:
        for proc in self.scripts:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        for data_dir in self.data_dirs:  # also a weed the test never saw serving
            flag = f"-dir={data_dir / 'data'}"
            for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                except OSError:
                    continue
                if flag in argv and argv[0].endswith("weed"):
                    self.weeds.add(pid)
                    self.ports |= weed_ports(pid)
        for pid in self.weeds:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            assert gone(pid, 10)
        for sock in sockets(self.ports):
            sock.unlink(missing_ok=True)


@pytest.fixture
def launched() -> Iterator[Launched]:
    runs = Launched()
    try:
        yield runs
    finally:
        runs.cleanup()


def weed_ports(pid: int) -> set[int]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return {int(m.group(1)) for arg in argv if (m := re.fullmatch(r"-[a-z0-9]+\.port(?:\.grpc)?=(\d+)", arg))}


def sockets(ports) -> list[Path]:
    """weed's unix sockets of these ports (always in /tmp)."""
    return sorted(s for p in ports for s in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"))


def alive(pid: int) -> bool:
    try:  # an orphan's zombie, not yet reaped by PID 1, is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def run_script(data_dir: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--port", str(port), "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def test_sighup_stops_weed_and_removes_its_sockets(tmp_path: Path, launched: Launched):
    proc, weed = launched.start(tmp_path / "s3", PORT)
    ports = weed_ports(weed)
    assert sockets(ports)
    os.killpg(proc.pid, signal.SIGHUP)  # what a closed terminal sends: the whole group, weed included
    assert proc.wait(30) == 128 + signal.SIGHUP  # exited as from Ctrl-C (its `with` ran), not killed
    assert gone(weed, 15), "weed outlived the script"
    assert sockets(ports) == []


def test_sigkill_of_the_script_takes_weed_down(tmp_path: Path, launched: Launched):
    data_dir = tmp_path / "s3"
    proc, weed = launched.start(data_dir, PORT + 1)
    proc.kill()  # no handler, no atexit: only PR_SET_PDEATHSIG can stop weed now
    proc.wait()
    assert gone(weed, 30), "weed outlived the SIGKILLed script"
    # Port and data dir are free again: the same command starts, and stops clean on SIGTERM.
    proc, weed = launched.start(data_dir, PORT + 1)
    proc.terminate()
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert gone(weed, 15) and sockets(launched.ports) == []


def test_next_start_removes_only_the_stale_sockets_of_a_killed_weed(tmp_path: Path, launched: Launched):
    data_dir = tmp_path / "s3"
    proc, weed = launched.start(data_dir, PORT + 2)
    old_ports = weed_ports(weed)
    os.killpg(proc.pid, signal.SIGKILL)  # weed killed too (kill -9 of the group, OOM): it leaves its sockets
    proc.wait()
    assert gone(weed, 15)
    left = sockets(old_ports)
    assert len(left) >= 6, left
    # One of them now belongs to a live process (say, another server got that port): not stale.
    taken = next(s for s in left if not s.name.endswith(f"-{PORT + 2}.sock"))
    taken.unlink()
    holder = socket.socket(socket.AF_UNIX)
    foreign = Path(f"/tmp/seaweedfs-test-{FOREIGN_PORT}.sock")  # stale, but of no port of this server
    try:
        holder.bind(str(taken))
        holder.listen()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(foreign))
        proc, weed = launched.start(data_dir, PORT + 2)
        new_ports = weed_ports(weed)
        assert taken.exists() and foreign.exists()
        stale = [s for s in left if s != taken and int(s.stem.rsplit("-", 1)[1]) not in new_ports]
        assert stale and not any(s.exists() for s in stale), stale
        proc.terminate()
        assert proc.wait(30) == 128 + signal.SIGTERM and gone(weed, 15)
        assert sockets(new_ports) == []
    finally:
        holder.close()
        taken.unlink(missing_ok=True)
        foreign.unlink(missing_ok=True)


def test_a_busy_port_is_one_line_naming_the_fix(tmp_path: Path):
    with socket.create_server(("127.0.0.1", PORT + 3)):
        out = run_script(tmp_path / "s3", PORT + 3)
    assert out.returncode == 2, out
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line, no traceback
    assert out.stderr.startswith(f"error: port {PORT + 3} on 127.0.0.1 is already in use") and "--port" in out.stderr


def test_a_data_dir_in_use_is_one_line_naming_the_fix(tmp_path: Path, launched: Launched):
    data_dir = tmp_path / "s3"
    proc, weed = launched.start(data_dir, PORT + 4)
    out = run_script(data_dir, PORT + 5)
    assert out.returncode == 2, out
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # no traceback, no Go panic
    assert out.stderr.startswith(f"error: data directory {data_dir} is in use by weed (pid {weed})")
    assert "--data-dir" in out.stderr
    assert proc.poll() is None and alive(weed)  # the first server is untouched
    assert sockets({PORT + 5}) == []
    proc.terminate()
    assert proc.wait(30) == 128 + signal.SIGTERM and gone(weed, 15)
