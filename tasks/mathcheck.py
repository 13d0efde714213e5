"""math-verify under a time limit. Its parse and verify run sympy on model output, and some outputs
never finish (`\\boxed{9^{9^{9^{9}}}}` spins for minutes); its own timeouts use signal.alarm, which
works only in a main thread, and Prefect runs tasks in worker threads. So every check runs in one
child process (this file run as a script: it imports math-verify only, and reads its stdin to the
end, so it ends with its parent), killed and replaced when a check passes the limit: that answer
counts wrong. The limit is the check's own: a new child says when it has imported math-verify and
checked one answer, and the clock starts after that (starting took over 2 s on a busy CI machine and
cut off answers that check in 20 ms)."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

LIMIT_S = 10.0  # math-verify's own default is 5 s per parse and per verify
START_S = 300.0  # a new child's import and first check (under 1 s on a quiet machine)
log = logging.getLogger(__name__)
_lock = threading.Lock()
_child: subprocess.Popen | None = None
_READY = "ready\n"
_gave_up: set[tuple[str, str, float]] = set()  # checks cut off at their limit: counted wrong, recorded apart


def _check(gold: str, output: str) -> tuple[bool, str | None]:
    """In the child's main thread, where math-verify's own signal timeouts (5 s) work too."""
    from math_verify import parse, verify

    parsed_gold, parsed = parse(gold), parse(output)
    return bool(verify(parsed_gold, parsed)), (str(parsed[-1]) if parsed else None)


def _stop() -> None:
    global _child
    child, _child = _child, None
    if child is not None:
        child.kill()  # a check that never ends takes no signal politely
        child.wait()
        child.stdin.close()
        child.stdout.close()


atexit.register(_stop)


def _reply(child: subprocess.Popen, deadline: float) -> str | None:
    """The child's next line, or None at the deadline."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([child.stdout], [], [], left)[0]:
            return None
        chunk = os.read(child.stdout.fileno(), 1 << 16)
        if not chunk:
            raise RuntimeError(f"the math-verify process ended (exit code {child.wait()})")
        line += chunk
    return line.decode()


def _start() -> subprocess.Popen:
    """A child that has imported math-verify and checked one answer, ready for the next."""
    child = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    if _reply(child, time.monotonic() + START_S) != _READY:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
        raise RuntimeError(f"the math-verify process did not start within {START_S:g} s")
    return child


@functools.lru_cache(maxsize=4096)  # MATH asks twice per item: its score, then its record's answer
def check(gold: str, output: str, limit: float = LIMIT_S) -> tuple[bool, str | None]:
    """(output's answer equals gold's, the answer math-verify extracted); (False, None) after `limit` s."""
    global _child
    with _lock:  # one child, one check at a time (also from several threads)
        if _child is None or _child.poll() is not None:
            _child = _start()
        _child.stdin.write((json.dumps([gold, output]) + "\n").encode())
        _child.stdin.flush()
        line = _reply(_child, time.monotonic() + limit)
        if line is None:
            _stop()
            log.warning("math-verify gave up on an answer after %g s (counted wrong): %.80r", limit, output)
            _gave_up.add((gold, output, limit))
            return False, None
        correct, extracted = json.loads(line)
        return correct, extracted


def gave_up(gold: str, output: str, limit: float = LIMIT_S) -> bool:
    """Whether check(gold, output, limit) was cut off at its limit: a wrong answer that a less busy
    machine might have found right, so a score says how many it had."""
    return (gold, output, limit) in _gave_up


if __name__ == "__main__":  # the child: one JSON line in, one out, until stdin ends
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever math-verify, sympy or antlr print goes to stderr, not into the replies
    _check("$\\boxed{\\frac{1}{2}}$", "\\boxed{0.5}")  # imports, and warms sympy and antlr
    print(_READY, end="", file=replies, flush=True)
    for request in sys.stdin:
        print(json.dumps(_check(*json.loads(request))), file=replies, flush=True)
