"""What a run prints: quiet by default (Prefect's task lines and one progress line per stage),
library logs and progress bars only when verbose (`SMOLFLOW_VERBOSE=1`, or the CLI's --verbose).

The libraries are loud in different ways, each handled where it starts:
- importing alpaca_eval sets the root logger to INFO, so httpx logs every Prefect API request
  (`keep_root_level` around those imports; httpx/httpcore pinned to WARNING);
- lm-eval warns twice per benchmark that it was handed a model object, which smolflow always does;
- transformers draws "Loading weights"/"Writing model shards" bars on every load and save, datasets
  one per map, lm-eval one per request type (`quiet_bars`).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import logging
import os
import re
import sys
import warnings

ENV = "SMOLFLOW_VERBOSE"

# Library loggers that talk at INFO (or print progress) in a normal run.
_CHATTY = ("httpx", "httpcore", "urllib3", "filelock", "fsspec", "s3fs", "botocore", "aiobotocore", "alpaca_eval",
           "lm_eval", "accelerate", "peft", "trl", "wandb")
# Warnings about how smolflow calls a library on purpose: said once per process at most, never when quiet.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")
# Libraries' deprecation notices (e.g. peft asking transformers' `is_gradient_checkpointing`) are for
# their callers' developers, not for whoever runs a run: shown only when verbose.
_DEPRECATIONS = ("ignore", None, FutureWarning, r"(transformers|peft|trl|accelerate|datasets|lm_eval|huggingface_hub)(\.|$)")


def verbose() -> bool:
    """True when library logs and progress bars should be shown."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _Quiet(logging.Filter):
    """Drops the expected warnings and repeats of any other message (first one kept)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # One decision per record: a record passes every root handler, and the second must not
        # take it for a repeat.
        decided = getattr(record, "_smolflow_shown", None)
        if decided is None:
            decided = record._smolflow_shown = self._decide(record)
        return decided

    def _decide(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_CHATTY):  # Prefect's own lines repeat on purpose (one per task)
            return True
        message = record.getMessage()
        if any(text in message for text in _EXPECTED):
            return False
        key = (record.name, record.levelno, message)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_FILTER = _Quiet()


_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/?#@]+@", re.I)  # scheme://user:password@


class _NoCredentials(logging.Filter):
    """A URL's user:password@ out of the lines that print URLs: httpx logs every request's URL when
    verbose, and Prefect's engine says "View at <UI URL>", which it derives from PREFECT_API_URL. With
    a Prefect server behind basic auth (https://user:password@host/api) the password went to the
    console, and from there into W&B's output.log, once per Prefect API call."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = _USERINFO.sub(r"\1", message), ()
        return True


_NO_CREDENTIALS = _NoCredentials()


def configure_logging(verbose_: bool | None = None) -> bool:
    """Quiet (default) or verbose console for this process and the processes it starts; returns
    the mode. None: from the environment (SMOLFLOW_VERBOSE)."""
    if verbose_ is None:
        verbose_ = verbose()
    os.environ[ENV] = "1" if verbose_ else "0"  # read again by quiet_bars and by child processes
    os.environ.setdefault("WANDB_SILENT", "false" if verbose_ else "true")
    level = logging.INFO if verbose_ else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level)
    for name in ("httpx", "prefect.flow_runs"):  # on the loggers that log the URLs: once, however often this runs
        logging.getLogger(name).addFilter(_NO_CREDENTIALS)
    root = logging.getLogger()
    # On the handlers, not the loggers: a logger's filter misses what its children propagate.
    for handler in root.handlers:
        (handler.removeFilter if verbose_ else handler.addFilter)(_FILTER)
    if root.level < logging.WARNING and not verbose_:
        root.setLevel(logging.WARNING)  # Prefect's default, lowered by alpaca_eval's import
    action, _, category, module = _DEPRECATIONS
    warnings.filterwarnings(action, category=category, module=module)  # once, however often this runs
    if verbose_:
        warnings.filters[:] = [f for f in warnings.filters if not (f[0] == action and f[2] is category
                                                                   and getattr(f[3], "pattern", None) == module)]
    _library_switches(verbose_)
    return verbose_


def _library_switches(verbose_: bool) -> None:
    import huggingface_hub.utils

    if verbose_:
        huggingface_hub.utils.enable_progress_bars()
    else:
        huggingface_hub.utils.disable_progress_bars()
    # transformers and datasets only once something imports them: importing them just to quiet
    # them cost ~1 s each of every cached re-run (transformers imports torch), which loads no model
    # and reads no dataset (tasks/data.py finds unchanged data without it).
    after_import("transformers", _transformers_switches, key="console")
    after_import("datasets", _datasets_switches, key="console")


def _transformers_switches() -> None:
    import transformers

    if verbose():  # the mode as it is when transformers is imported (configure_logging set it)
        transformers.logging.set_verbosity_warning()
        transformers.logging.enable_progress_bar()
    else:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _datasets_switches() -> None:
    import datasets

    if verbose():  # the mode as it is when datasets is imported (configure_logging set it)
        datasets.logging.set_verbosity_warning()
        datasets.enable_progress_bars()
    else:
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def after_import(name: str, then, key: str) -> None:
    """Run `then()` now if module `name` is imported, else right after its first import (a later
    call with the same name and key replaces a pending one): settings for a heavy library that a
    process may never import (a cached re-run loads no model)."""
    for finder in [f for f in sys.meta_path if isinstance(f, _AfterImport) and (f.name, f.key) == (name, key)]:
        sys.meta_path.remove(finder)
    if name in sys.modules:
        then()
    else:
        sys.meta_path.insert(0, _AfterImport(name, then, key))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then()` right after the module `name` is first imported (then steps aside)."""

    def __init__(self, name: str, then, key: str) -> None:
        self.name, self.then, self.key = name, then, key

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        # Stepped aside while the real finders look (no recursion), then back: importlib.util.find_spec
        # (a look-up, no import: tasks/checks.py reads transformers' source) asks here too.
        index = sys.meta_path.index(self)
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(index, self)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run, then = spec.loader.exec_module, self.then

            def exec_module(module):
                run(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                then()

            spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


@contextlib.contextmanager
def keep_root_level():
    """Undo what an import does to the root logger's level (alpaca_eval sets it to INFO)."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def quiet_bars():
    """Swallow what a library writes to stderr (lm-eval's tqdm bars, which take no global switch)
    unless verbose. Log handlers keep their own streams, so Prefect's lines still show."""
    if verbose():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
