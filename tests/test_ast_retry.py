"""CPython 3.11.0-3.11.7's AST race (gh-106905) is retried: a flow run once failed in CI with
"SystemError: AST constructor recursion depth mismatch". The race is forced here, not waited for:
while one thread builds its tree, the collector runs a finalizer that has a second thread parse in
full before the first goes on."""

import ast
import gc
import threading

import pytest

import tasks  # noqa: F401  (installs the retry, as every smolflow process does)
from tasks.ast_retry import AFFECTED

SOURCE = "\n".join(f"def f{i}(a, b=[1, 2, (3, 4)]):\n    return [x * y for x in a if x for y in b]" for i in range(30))


def _parse_interrupted(parse):
    """`parse(SOURCE)` on this thread while the collector, partway through building the tree, has
    another thread run `parse` to the end. Returns the tree or the exception."""
    go, done = threading.Event(), threading.Event()

    def other():
        go.wait(10)
        parse("x = [1, (2, 3)]")
        done.set()

    class Handoff:
        def __del__(self):
            go.set()
            done.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    threshold = gc.get_threshold()
    gc.collect()
    try:
        handoff = Handoff()
        handoff.cycle = handoff  # garbage that only the collector frees
        del handoff
        gc.set_threshold(20)  # a collection ~20 allocations in: inside the tree's construction
        try:
            return parse(SOURCE)
        except SystemError as e:
            return e
    finally:
        gc.set_threshold(*threshold)
        go.set()
        thread.join()


def test_a_parse_interrupted_by_another_threads_parse_returns_the_whole_tree():
    expected = ast.dump(ast.parse(SOURCE))
    for _ in range(3):
        tree = _parse_interrupted(ast.parse)
        assert isinstance(tree, ast.Module), tree
        assert ast.dump(tree) == expected


def test_the_retry_is_installed_exactly_where_python_has_the_race():
    """Where this Python has the race, the plain parse fails the same interleaving (so the test above
    exercises the bug) and the retry wraps it; where it has not, the plain parse survives it and
    `ast.parse` is left as Python made it. A wrong version range fails one branch or the other."""
    if AFFECTED:
        failure = _parse_interrupted(ast.parse.__wrapped__)
        assert isinstance(failure, SystemError) and "recursion depth mismatch" in str(failure), failure
    else:
        assert not hasattr(ast.parse, "__wrapped__")
        tree = _parse_interrupted(ast.parse)
        assert isinstance(tree, ast.Module), tree


def test_real_errors_are_not_retried_away():
    with pytest.raises(SyntaxError):
        ast.parse("x = (")
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise SystemError("something else")

    from tasks.ast_retry import retrying

    with pytest.raises(SystemError, match="something else"):
        retrying(broken)("x")
    assert len(calls) == 1
