"""Where a score's items came from, whether it may be read next to published numbers, and the key
that says which other scores it can be compared with.

A score is comparable with another only when everything that moves it besides the model is equal:
the data (its bytes, or hub id and revision), the very items scored, the few-shot setting and its
examples, the prompt format/variant, the chat template, the generation settings and the scorer.
Those parts are hashed into `comparability_key`; the gate and the trend compare equal keys only.
In reduced precision the arrangement is a part too: which kernels ran (CPU model and units, or the
GPU), the CPU threads, the batch size and how the items were split into runs. In fp32 these move
no pick and no generated text, only a log-likelihood's last recorded digit (Ray against a local
run, 50 items per benchmark). In bf16 they move answers: on a Xeon with AMX, 19 of 50 MATH
generations matched between a local run and Ray item shards (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tasks.runtime import FIXTURES, hub_offline

FIXTURE_NOTE = "fixture: hand-written items, not comparable to published scores"
# Bump when smolflow's own scoring changes (filters it adds, record fields), so old keys stop matching.
SCORER_VERSION = "smolflow-scorer-2"

_logged_fixture: set[str] = set()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest(value: Any) -> str:
    """A short stable hash of any JSON-able value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_revision(repo: str) -> str | None:
    """The commit of the hub dataset in the local Hugging Face cache (what an offline run reads), or None."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def hub_revision(repo: str) -> str | None:
    """The hub dataset's current commit; offline, the cached copy's (two scores from different cached
    revisions are not comparable); None when neither is known (recorded as unresolved)."""
    if hub_offline():
        return cached_revision(repo)
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo).sha
    except Exception:  # noqa: BLE001 - provenance must never fail a finished evaluation
        return None


def files_digest(path: Path) -> str:
    """The sha256 of a file, or of every file under a folder (remembered by their identity)."""
    from tasks.runtime import remembered_digest, sha256_files

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return remembered_digest("files", files, lambda: sha256_files(files))


def hub_identity(hub: tuple[str, str | None]) -> str:
    return f"hub:{hub[0]}:{hub[1]}@{hub_revision(hub[0]) or 'unresolved'}"


# Test items in the complete hub sets: a local folder holding exactly these many is taken for a mirror.
FULL_SIZE = {"mmlu": 14042, "bbh": 6511, "gsm8k": 1319, "math": 500, "humaneval": 164}


def _test_rows(files: dict[str, str]) -> int:
    import gzip

    from tasks.benchmarks.rows import read_rows

    def count(path: str) -> int:
        if path.endswith(".gz"):  # HumanEval's own file format
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return sum(1 for line in f.read().split("\n") if line.strip())
        return len(read_rows(path))

    return sum(count(p) for split, p in files.items() if split not in ("train", "dev", "validation"))


def provenance(name: str, hub: tuple[str, str | None], data: str, files: dict[str, str] | None,
               reference_settings: bool, full_set: bool) -> dict[str, Any]:
    """The score's source (hub id + revision, local path + sha256, or fixture) and its comparability
    with the published figures (which need the real data, every item, and the reference settings).
    Local files count as real data only when they hold as many test items as the hub's full set."""
    if files is None:
        revision = hub_revision(hub[0])
        source = {"source": "hub", "hub_id": hub[0], "config": hub[1], "revision": revision or "unresolved"}
        real = True
    else:
        sha = {split: sha256_file(path) for split, path in sorted(files.items())}
        fixture = all(Path(p).resolve().is_relative_to(FIXTURES.resolve()) for p in files.values())
        source = {"source": "fixture" if fixture else "local", "path": data if not fixture else str(FIXTURES / name),
                  "files": dict(sorted(files.items())), "sha256": sha}
        rows = _test_rows(files)
        source["test_items"] = rows
        real = not fixture and rows == FULL_SIZE.get(name)
    comparable = real and reference_settings and full_set
    if source["source"] == "fixture":
        note = FIXTURE_NOTE
    elif not real:
        note = (f"local files with {source['test_items']} test items, not the {FULL_SIZE.get(name)} of {hub[0]}: "
                "not comparable to published scores")
    elif comparable:
        note = ("comparable to published scores" if source["source"] == "hub" else
                f"comparable to published scores if these are {hub[0]}'s items: local files with as many "
                "(taken for a mirror by their count; their sha256 is recorded, not checked against the hub's)")
    else:
        why = [w for w, bad in (("a subset of the items (limit)", not full_set),
                                ("settings other than the reference's", not reference_settings)) if bad]
        note = f"real data, not comparable to published scores: {' and '.join(why)}"
    if source["source"] == "fixture":
        log_fixture_once(name)
    return source | {"comparable_to_published": comparable, "note": note, "real_data": real,
                     "reference_settings": reference_settings, "every_item": full_set}


def with_every_item(prov: dict[str, Any], every: bool) -> dict[str, Any]:
    """The provenance of shards merged back into one score: every item or not, as the union says."""
    if "real_data" not in prov or prov["every_item"] == every:
        return prov
    comparable = prov["real_data"] and prov["reference_settings"] and every
    note = prov["note"]
    if prov["real_data"]:
        note = ("comparable to published scores" if comparable else
                "real data, not comparable to published scores: " + " and ".join(
                    w for w, bad in (("a subset of the items (limit)", not every),
                                     ("settings other than the reference's", not prov["reference_settings"])) if bad))
    return prov | {"every_item": every, "comparable_to_published": comparable, "note": note}


def log_fixture_once(name: str) -> None:
    """Say once per flow run (once per process outside one) that fixture scores are not real scores."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        run = str(ctx.flow_run.id) if ctx and ctx.flow_run else "process"
    except Exception:  # noqa: BLE001
        run = "process"
    if run in _logged_fixture:
        return
    _logged_fixture.add(run)
    from tasks.runtime import run_logger

    try:
        run_logger().warning("%s (%s and any other benchmark on fixture data)", FIXTURE_NOTE, name)
    except Exception:  # noqa: BLE001 - no Prefect context: plain logging
        logging.getLogger("smolflow").warning("%s (%s)", FIXTURE_NOTE, name)


# scoring: the log-likelihood passes a GPU's probe picked (recorded off the CPU only: base.py).
ARRANGEMENT = ("kernels", "torch_threads", "batch_size", "split", "scoring")


def arrangement(model, batch_size: int | None) -> dict[str, Any]:
    """How a model computed a score's items, as settings: recorded with every score, in its key only
    in reduced precision. CPU threads only on the CPU (a GPU's kernels do not depend on them)."""
    import torch

    from tasks.device import kernels

    cpu = model.device.type == "cpu"
    return {"kernels": kernels(model.device), "torch_threads": torch.get_num_threads() if cpu else None,
            "batch_size": batch_size}


def comparability(name: str, prov: dict[str, Any], records: list[dict], settings: dict[str, Any],
                  metric: str) -> tuple[str, dict[str, Any]]:
    """(key, parts): a hash of everything besides the model that moves the score, and the parts."""
    if prov.get("source") == "hub":
        data = f"{prov['hub_id']}:{prov.get('config')}@{prov.get('revision')}"
    else:
        data = digest(prov.get("sha256"))
    items = sorted((str(r.get("subset") or ""), str(r.get("doc_id"))) for r in records)
    parts = {
        "benchmark": name,
        "data": data,
        "items": digest(items),
        "n": len(items),
        "num_fewshot": settings.get("num_fewshot"),
        "fewshot": digest(settings.get("fewshot")),
        "format": settings.get("format") or settings.get("variant") or settings.get("stock_task"),
        "chat_template": settings.get("apply_chat_template"),
        "generation": digest(settings.get("generation_kwargs")),
        "precision": settings.get("dtype"),
        "scorer": f"{metric} | {settings.get('engine')} | {settings.get('stock_task')} | "
                  f"{digest(settings.get('answer_extraction'))} | {SCORER_VERSION}",
    } | arranged(settings)
    return digest(parts), parts


def arranged(settings: dict[str, Any]) -> dict[str, Any]:
    """The arrangement part of a key: only in reduced precision (see the module's docstring), so
    fp32 keys stay what they were."""
    if settings.get("dtype") in (None, "float32"):
        return {}
    # `scoring` only where it was recorded, so the keys of every other score stay what they were.
    return {"arrangement": {k: settings.get(k) for k in ARRANGEMENT if k != "scoring" or settings.get(k) is not None}}


def custom_provenance(bench, records: list[dict], judge: str | None, dtype: str | None,
                      how: dict[str, Any] | None = None, engine: str | None = None) -> dict[str, Any]:
    """Provenance and key of a custom benchmark's score: its fingerprint covers the definition, the
    items and the scoring code; with the items scored, the judge, the precision, the generation
    engine (and in reduced precision `how`, the arrangement) it is the key."""
    parts = {"benchmark": f"custom/{bench.name}", "data": bench.fingerprint, "n": len(records),
             "items": digest([r["doc_id"] for r in records]), "judge": judge, "precision": dtype, "engine": engine}
    parts |= arranged((how or {}) | {"dtype": dtype})
    return {"provenance": {"source": "local", "path": str(bench.path), "sha256": bench.fingerprint,
                           "comparable_to_published": False, "note": "custom benchmark: your items, no published scores"},
            "comparability_key": digest(parts), "comparability": parts}


def why_not_comparable(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """The parts two comparability records differ in, in words."""
    if not a or not b:
        return "no comparability key on " + ("the reference" if not a else "this score") + " (scored before keys were recorded)"
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = []
    for k in diff:
        if k == "n":
            shown.append(f"n {a.get(k)} vs {b.get(k)}")
        elif k in ("num_fewshot", "format", "chat_template", "benchmark", "precision"):
            shown.append(f"{k} {a.get(k)} vs {b.get(k)}")
        elif k == "arrangement":  # reduced precision: name what moved (a precision apart says it all)
            if a.get("precision") != b.get("precision"):
                continue
            x, y = a.get(k) or {}, b.get(k) or {}
            moved = [f"{f} {x.get(f)} vs {y.get(f)}" for f in ARRANGEMENT if x.get(f) != y.get(f)]
            shown.append("computed differently in reduced precision (" + ("; ".join(moved) if x and y else
                         "arrangement not recorded on " + ("the reference" if not x else "this score")) + ")")
        else:
            shown.append(f"different {k}")
    return ", ".join(shown) or "different keys"
