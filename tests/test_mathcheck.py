"""math-verify under a time limit (tasks/mathcheck.py): an answer whose check never ends counts
wrong within the limit, in a child process that is killed, and the next check works."""

import os
import subprocess
import time

from tasks import mathcheck
from tasks.benchmarks import REGISTRY
from tasks.benchmarks.math import process_results
from tasks.config import BenchmarkConfig
from tests.test_benchmarks import AnswerKey


def _children() -> list[str]:
    # This process's children only: other xdist workers have math-verify children of their own.
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.endswith("/tasks/mathcheck.py")]


def test_an_answer_whose_check_never_ends_counts_wrong_within_the_limit():
    assert process_results({"solution": "$\\boxed{\\frac12}$"}, ["so \\boxed{0.5}"]) == {"math_verify": 1,
                                                                                        "check_timed_out": 0}
    started = time.monotonic()
    assert mathcheck.check("$\\boxed{3}$", "\\boxed{9^{9^{9^{9}}}}", limit=3) == (False, None)  # spun for minutes
    assert time.monotonic() - started < 5
    assert mathcheck._child is None and not _children()  # killed, not left spinning
    assert process_results({"solution": "$\\boxed{3}$"}, ["\\boxed{3}"])["math_verify"] == 1  # a new child
    mathcheck._stop()
    assert not _children()


def test_a_slow_start_does_not_count_against_the_check(monkeypatch, tmp_path):
    """A new child's start (Python, math-verify's import) took over 2 s on a busy CI machine, and the
    2 s limit cut off answers that check in 20 ms. The clock starts when the child is ready."""
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")  # a start slower than the limit
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    mathcheck._stop()
    started = time.monotonic()
    assert mathcheck.check("$\\boxed{7}$", "so \\boxed{7}", limit=1.5) == (True, "7")
    assert time.monotonic() - started > 3  # the slow start happened, outside the limit
    assert not mathcheck.gave_up("$\\boxed{7}$", "so \\boxed{7}", limit=1.5)
    mathcheck._stop()


class OneSpins(AnswerKey):
    """The gold solution, except item 0: an answer whose check never ends."""

    def generate_until(self, requests):
        return ["\\boxed{9^{9^{9^{9}}}}" if r.doc_id == 0 else r.doc["solution"] for r in requests]


def test_a_check_cut_off_is_recorded_apart_from_a_wrong_answer(monkeypatch):
    """A check past its limit counted wrong with nothing said: the MATH score moved with the
    machine's load and nobody could tell. Now each such item says so, the score carries their share
    (metric check_timed_out) and its settings the limit."""
    monkeypatch.setattr(mathcheck, "LIMIT_S", 2.0)
    result = REGISTRY["math"].evaluate_lm(OneSpins(right=True), BenchmarkConfig(name="math", limit=3, data="fixture"))
    assert [r["check_timed_out"] for r in result.records] == [True, False, False]
    assert [r["correct"] for r in result.records] == [False, True, True]
    assert result.metrics["check_timed_out,none"] == 1 / 3 and result.score == 2 / 3
    assert "2 s per answer" in result.settings["answer_check"]
    mathcheck._stop()
