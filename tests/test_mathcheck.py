"""math-verify under a time limit (tasks/mathcheck.py): an answer whose check never ends counts
wrong within the limit, in a child process that is killed, and the next check works."""

import os
import subprocess
import time

from tasks import mathcheck
from tasks.benchmarks.math import process_results


def _children() -> list[str]:
    # This process's children only: other xdist workers have math-verify children of their own.
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.endswith("/tasks/mathcheck.py")]


def test_an_answer_whose_check_never_ends_counts_wrong_within_the_limit():
    assert process_results({"solution": "$\\boxed{\\frac12}$"}, ["so \\boxed{0.5}"]) == {"math_verify": 1}
    started = time.monotonic()
    assert mathcheck.check("$\\boxed{3}$", "\\boxed{9^{9^{9^{9}}}}", limit=3) == (False, None)  # spun for minutes
    assert time.monotonic() - started < 5
    assert mathcheck._child is None and not _children()  # killed, not left spinning
    assert process_results({"solution": "$\\boxed{3}$"}, ["\\boxed{3}"]) == {"math_verify": 1}  # a new child
    mathcheck._stop()
    assert not _children()
