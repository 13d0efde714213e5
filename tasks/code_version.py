"""What code computed a cached result: a digest of a module's source and of every smolflow module
it reaches, so that a fix anywhere on the way (a scorer, the generation loop, a check) computes
afresh what the old code cached, where Prefect's TASK_SOURCE sees only the task function itself.

Reached = imported (at the top or inside a function: smolflow imports lazily) or started by name
(`-m tasks.train_worker`, `sandbox_init.py` next to the module). Found by reading the source (ast),
never by importing: computing a key must not run the code it describes. Stdlib and tasks.runtime only."""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding tasks/
PACKAGE = "tasks"  # the tasks never import flows/ or deployments/ (tests/test_structure.py)
# The libraries whose versions change what a cached result holds (generation, training, scoring).
LIBRARIES = ("torch", "transformers", "tokenizers", "trl", "peft", "accelerate", "datasets", "lm_eval",
             "math-verify", "alpaca-eval")
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _file_of(name: str, roots: tuple[tuple[str, Path], ...]) -> Path | None:
    """The source file of module `name` if it is in one of the packages `roots` names (package,
    the folder holding it), by path alone (no import); else None."""
    root = dict(roots).get(name.split(".")[0])
    if root is None:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _reached(path: Path, name: str, roots: tuple[tuple[str, Path], ...]) -> frozenset[Path]:
    """The source files in `roots`' packages that the module at `path` (named `name`) imports or
    starts by name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # a name may be a submodule
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.endswith(".py") and "/" not in node.value and (path.parent / node.value).is_file():
                found.add(path.parent / node.value)  # Path(__file__).with_name("sandbox_init.py")
            elif _MODULE_NAME.match(node.value):  # "-m", "tasks.train_worker"
                names = [node.value]
        found.update(p for p in (_file_of(n, roots) for n in names) if p is not None)
    return frozenset(found)


@functools.cache
def source_closure(module: str) -> tuple[Path, ...]:
    """The source files of `module` and of every module it reaches in its own package and in
    smolflow's, transitively."""
    loaded = getattr(sys.modules.get(module), "__file__", None)
    start = Path(loaded).resolve() if loaded else _file_of(module, ((PACKAGE, ROOT),))
    if start is None:
        raise ValueError(f"no source file for module {module!r}")
    depth = module.count(".") + (start.name == "__init__.py")
    roots = tuple({PACKAGE: ROOT, module.split(".")[0]: start.parents[depth]}.items())
    names, todo = {start: module}, [start]
    while todo:
        path = todo.pop()
        for found in _reached(path, names[path], roots):
            if found not in names:
                root = next((r for _, r in roots if found.is_relative_to(r)), found.parent)
                names[found] = ".".join(p for p in found.relative_to(root).with_suffix("").parts if p != "__init__")
                todo.append(found)
    return tuple(sorted(names))


def _identity(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_ino, st.st_size, st.st_mtime_ns]


@functools.cache
def code_digest(module: str) -> str:
    """sha256 of the sources `module` reaches (tasks/…, by path relative to ROOT) and their contents.
    Remembered in SMOLFLOW_CACHE/digests under the files' identity (inode, size, mtime), as git's
    index is: reading and parsing the ~70 files of training's took ~0.2 s of a ~6 s cached re-run.
    Sound: which files a module reaches is decided by those files' contents."""
    from tasks.runtime import CacheUnusable, atomic_write, cache_dir

    memo = None
    try:
        where = f"{ROOT}|{module}|{getattr(sys.modules.get(module), '__file__', '')}"  # one name, another folder: another module
        memo = cache_dir("digests") / f"code-{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if all(_identity(Path(f[0])) == f for f in saved["files"]):
            return saved["digest"]
    except (CacheUnusable, OSError, ValueError, KeyError, TypeError):
        pass
    digest, files = hashlib.sha256(), source_closure(module)
    for path in files:
        label = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        digest.update(f"{label}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    identities = [_identity(path) for path in files]
    # A file written in the last 2 s may change again within its mtime's tick: not remembered ("racy").
    if memo is not None and all(time.time_ns() - f[3] > 2e9 for f in identities):
        with contextlib.suppress(CacheUnusable, OSError):
            atomic_write(memo, json.dumps({"module": module, "files": identities, "digest": digest.hexdigest()}))
    return digest.hexdigest()


@functools.cache
def library_versions() -> tuple[str, ...]:
    """`name==version` of each of LIBRARIES (`name absent` where it is not installed)."""
    out = []
    for name in LIBRARIES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} absent")
    return tuple(out)


def computed_by(module: str) -> str:
    """What computes a result in `module`: its code (code_digest) and the libraries' versions."""
    return hashlib.sha256(f"{code_digest(module)}{library_versions()}".encode()).hexdigest()
