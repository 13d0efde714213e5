"""The local Prefect server's log (`smolflow serve`): its own errors (a database it cannot open)
are written nowhere else. One file per start, the previous kept, each capped: bounded over months."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

LOG_NAME = "smolflow-server.log"
LOG_LIMIT = 10 * 2**20  # bytes: months of a server's warnings keep at most about twice this on disk
TAIL_LINES = 10  # of the server's log, under its error: the cause, not a screenful of its traceback


def server_log() -> Path:
    """A fresh file for the server's output, the one place its own errors (a database it cannot open)
    are written: PREFECT_HOME/smolflow-server.log, the previous start's kept as .1 (the
    crash a restart policy restarted after), so months of restarts keep two files, each capped by
    `cap_log`. A PREFECT_HOME that cannot be made (the server fails on it): a new file in the temp
    folder instead, so that failure can still be shown."""
    from prefect.settings import PREFECT_HOME  # what the server will read: the environment, a profile, .env

    try:
        home = Path(PREFECT_HOME.value()).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        log = home / LOG_NAME
        if log.exists():
            log.replace(log.with_name(LOG_NAME + ".1"))
        log.touch()
        return log
    except OSError:
        fd, name = tempfile.mkstemp(prefix="smolflow-prefect-server-", suffix=".log")
        os.close(fd)
        return Path(name)


def cap_log(log: Path, limit: int = LOG_LIMIT) -> None:
    """Past `limit` bytes, copy the log to .1 and empty it in place: the server appends (O_APPEND) to
    the same open file, so it writes on at the new end and one server's months never fill the disk."""
    try:
        if log.stat().st_size <= limit:
            return
        shutil.copyfile(log, log.with_name(log.name + ".1"))
        os.truncate(log, 0)
    except OSError:
        pass  # a log that cannot be capped now is no reason to stop the deployments


def log_tail(log: Path | None, lines: int = TAIL_LINES) -> str:
    """The last `lines` non-blank lines of the log, indented under an error line ('' if none)."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "".join(f"  {line.rstrip()}\n" for line in [ln for ln in text.splitlines() if ln.strip()][-lines:])
