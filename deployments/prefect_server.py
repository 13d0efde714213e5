"""`prefect server start`, with the paths of outside URLs kept out of its log.

The server runs the automations `smolflow alerts` makes. When a webhook answers an error, Prefect's
webhook block logs httpx's `HTTPStatusError: ... for url '<the webhook URL>'` in this process, and a
webhook's URL is its secret (Slack's, Teams' and Discord's carry the token in the path). Every log
record made here keeps such a URL's scheme and host only (and no user:password@); the server's own
address stays whole. The same server otherwise: `python -m deployments.prefect_server --host
127.0.0.1 --port 4200` is `prefect server start --host 127.0.0.1 --port 4200` (deployments/local.py).
"""

from __future__ import annotations

import logging
import re
import runpy
import sys
import traceback

_URL = re.compile(r"\b(https?://)(?:[^/\s'\"<>@]*@)?([^/\s'\"<>]+)(/[^\s'\"<>]*)?", re.I)


def redact_paths(text: str, own: tuple[str, ...] = ()) -> str:
    """`text` with each URL cut to its scheme and host (`https://hooks.example.com/…`), except on a
    host in `own`; user:password@ always goes."""
    def cut(m: re.Match) -> str:
        scheme, host, path = m.group(1), m.group(2), m.group(3) or ""
        return scheme + host + (path if host in own or not path else "/…")

    return _URL.sub(cut, text)


def keep_urls_out(own: tuple[str, ...]) -> None:
    """Every log record this process makes, whatever logs it and however its handlers are set up
    (Prefect's, uvicorn's): message and traceback redacted as it is made."""
    make = logging.getLogRecordFactory()

    def record(*args, **kwargs) -> logging.LogRecord:
        r = make(*args, **kwargs)
        try:
            r.msg, r.args = redact_paths(r.getMessage(), own), ()
        except Exception:  # a record whose arguments do not fit its message: left for logging to report
            return r
        if r.exc_info and r.exc_info[0] is not None:  # formatters use exc_text when it is set
            r.exc_text = redact_paths("".join(traceback.format_exception(*r.exc_info)).rstrip("\n"), own)
        return r

    logging.setLogRecordFactory(record)


def main() -> None:
    port = sys.argv[sys.argv.index("--port") + 1] if "--port" in sys.argv else "4200"
    keep_urls_out((f"127.0.0.1:{port}", f"localhost:{port}"))
    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]
    runpy.run_module("prefect", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
