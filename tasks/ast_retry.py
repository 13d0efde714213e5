"""`ast.parse` that retries CPython's spurious "AST constructor recursion depth mismatch".

CPython 3.11.0-3.11.7 keep one depth counter for building AST objects in the whole interpreter
(gh-106905, fixed in 3.11.8). When the garbage collector runs a finalizer while one thread builds a
tree, another thread can parse meanwhile; the first thread then finds the counter off and raises
SystemError although the tree it built is whole. (3.12 shares the counter until 3.12.2 but does not
switch threads there: 3.12.1 and 3.13.0 pass tests/test_ast_retry.py's forced interleaving unwrapped.)
A flow run has Prefect's event-loop and worker threads beside it, and pydantic, `inspect.signature`
and `traceback` all call `ast.parse`, so a run on such a Python failed at random (CI saw it: "Flow
run encountered an exception: SystemError: AST constructor recursion depth mismatch (before=45,
after=78)").
Parsing again is right: a parse changes nothing but the counter, which each call resets."""

from __future__ import annotations

import ast
import functools
import sys

AFFECTED = (3, 11, 0) <= sys.version_info[:3] < (3, 11, 8)
_SPURIOUS = "AST constructor recursion depth mismatch"
_TRIES = 4


def retrying(parse):
    """`parse`, called again (up to 4 tries in all) when it raises only the spurious mismatch."""

    @functools.wraps(parse)
    def parse_retrying(*args, **kwargs):
        for attempt in range(1, _TRIES + 1):
            try:
                return parse(*args, **kwargs)
            except SystemError as e:
                if _SPURIOUS not in str(e) or attempt == _TRIES:
                    raise

    return parse_retrying


def retry_spurious_ast_errors() -> None:
    """On an affected Python, every `ast.parse` (inspect's, traceback's, pydantic's) retries the
    spurious error; elsewhere nothing changes. Idempotent."""
    if AFFECTED and not hasattr(ast.parse, "__wrapped__"):
        ast.parse = retrying(ast.parse)
