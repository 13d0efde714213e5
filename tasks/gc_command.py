"""`smolflow gc`: run retention and the cache bound outside a run, with the settings the runs use.

Without flags it applies the retention the newest run under the root was configured with (its
config.json's output.keep_runs / keep_incomplete_hours: what that nightly applies after every run),
else the defaults; a bare `smolflow gc` once deleted runs 15-30 of a nightly that kept 30. Every
row of its table names the setting it applied and where it came from.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from tasks.config import OutputConfig
from tasks.retention import gc, scan_runs
from tasks.runs import runs_root
from tasks.storage import ArtifactStore

GC_FLAGS = {"keep_runs": "--keep-runs", "keep_incomplete_hours": "--keep-incomplete-hours"}


def check_gc_flags(keep_runs: int | None, keep_incomplete_hours: float | None) -> None:
    """The flags take what output.keep_runs and output.keep_incomplete_hours take (tasks/config.py):
    --keep-runs 0 with --keep-incomplete-hours 0 deleted a run still being written. One line naming the flag."""
    given = {k: v for k, v in (("keep_runs", keep_runs), ("keep_incomplete_hours", keep_incomplete_hours)) if v is not None}
    try:
        OutputConfig(**given)
    except ValidationError as err:
        e = err.errors()[0]
        field = e["loc"][0]
        flag, least = GC_FLAGS[field], e.get("ctx", {}).get("ge")
        raise ValueError(f"{flag} {e['input']}: {e['msg'][0].lower()}{e['msg'][1:]}, as for output.{field}"
                         + (f"; give {flag} {least:g} or more" if least is not None else "")) from None


def gc_settings(root: str, **flags: float | None) -> tuple[dict[str, float], dict[str, str]]:
    """({setting: value}, {setting: how the table names it}): each flag given, else the newest run's
    own setting (the one last written to), else OutputConfig's default."""
    newest, output = None, {}
    runs = scan_runs(root) if flags and None in flags.values() else []
    if runs:
        newest = max(runs, key=lambda r: (r.last_write, r.run_id)).run_id
        try:
            output = (ArtifactStore(root).child("runs", newest).read_json("config.json").get("output") or {})
        except (FileNotFoundError, ValueError, AttributeError):
            output = {}
    values, said = {}, {}
    for field, flag_value in flags.items():
        if flag_value is not None:
            values[field], whose = flag_value, f"{GC_FLAGS[field]}"
        else:
            try:  # a value the config would refuse (a hand-edited file): the default, as the run could not have had it
                values[field] = getattr(OutputConfig(**{field: output[field]}), field)
                whose = f"output.{field} of run {newest}, the newest"
            except (KeyError, ValidationError):
                values[field], whose = OutputConfig.model_fields[field].default, f"output.{field}, the default"
        said[field] = f"{whose}: {values[field]:g}"
    return values, said


def gc_command(root: str, dry_run: bool = False, keep_runs: int | None = None,
               keep_incomplete_hours: float | None = None) -> int:
    """`smolflow gc [--dry-run]`: print what is (or would be) deleted and why; exit status 0.
    Flags the config would refuse, and a --root that cannot hold runs (tasks.runs.runs_root), are
    refused in one line before anything is deleted; a local one that does not exist is said, and
    SMOLFLOW_CACHE is bounded all the same (`smolflow gc` from a folder without runs)."""
    check_gc_flags(keep_runs, keep_incomplete_hours)
    try:
        runs_root(root)
    except FileNotFoundError as err:  # a local root with no runs (or a typo): said, and the cache is still bounded
        print(f"smolflow gc: note: {err}; only SMOLFLOW_CACHE is bounded", file=sys.stderr)
    values, said = gc_settings(root, keep_runs=keep_runs, keep_incomplete_hours=keep_incomplete_hours)
    report = gc(root, dry_run=dry_run, said=said, **values)
    print(report.table(), flush=True)  # a closed stdout (`| head`) raises here, for smolflow's main to end quietly
    return 0
