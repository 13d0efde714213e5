"""The one layout of an artifact root and its run folders: every writer and reader names paths here.

    <root>/runs/<run_id>/...                 one folder per run (RunPaths below), local or S3
    <root>/pointers/<flow_name>/<name>.json  latest / promoted: which completed run they name
    <root>/pointers/smolflow-promotion.lock  on a local root: the lock they move under (pointers.pointer_lock)

Paths are relative (posix) strings, joined to a local directory or an s3:// prefix by
`tasks.storage.ArtifactStore`; a run folder without `manifest.json` is incomplete.
"""

from __future__ import annotations

import posixpath
import re

RUNS = "runs"
POINTERS = "pointers"


def run_dir(run_id: str) -> str:
    """A run's folder, relative to the artifact root."""
    return posixpath.join(RUNS, run_id)


def new_run_id(stamp: str, flow_run_name: str | None) -> str:
    """A new run's id: `stamp` (its start time) and the flow run's name. The Prefect UI's Run form
    takes any text as the name ('lr sweep 2/3'), but the id names the run folder (a '/' made a
    nested one, which no reader finds) and the W&B run (which refuses /:;,#?'): every run of other
    characters than letters, digits, '_' and '-' becomes one '-' (the shape tasks.runs.RUN_ID knows)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run_name or "").strip("-")
    return f"{stamp}-{name or 'local'}"


def pointer(flow_name: str, name: str) -> str:
    """A pointer object (latest, promoted), relative to the artifact root."""
    for label, value in (("flow_name", flow_name), ("pointer name", name)):
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"{label} {value!r} must be a non-empty name without slashes")
    return posixpath.join(POINTERS, flow_name, f"{name}.json")


class RunPaths:
    """Paths inside one run folder. Stages write their own files and their report section here."""

    config = "config.json"  # the RunConfig as run
    resolved = "resolved.json"  # every `auto` resolved, hardware decisions
    status = "status.json"  # running / failed (why, when) / complete
    manifest = "manifest.json"  # written last: a run without it is incomplete

    rendered_example = "template/rendered_example.txt"
    template_preview = "data/template_preview.md"
    token_lengths = "data/token_lengths.json"
    token_lengths_png = "data/token_lengths.png"

    model = "model"
    checkpoints = "checkpoints"

    samples = "samples/samples.jsonl"
    side_by_side = "samples/side_by_side.md"

    metrics = "training/metrics.json"
    log_history = "training/log_history.json"
    trainer_args = "training/trainer_args.json"  # every TrainingArguments value as run, + smolflow_levers
    curves = "training/curves.png"
    health = "training/health.json"
    health_md = "training/health.md"

    benchmarks = "benchmarks"
    comparison = "benchmarks/comparison.json"
    promoted_rescored = "benchmarks/promoted.json"  # the promoted run whose model was scored again (tasks/reference.py)

    judge_pairs = "judge/pairs.jsonl"
    judge_summary = "judge/summary.json"

    gate = "gate/decision.json"
    gate_md = "gate/decision.md"

    report = "report/report.md"
    report_html = "report/report.html"
    trend = "report/trend.png"
    sections = "report/sections"

    wandb = "wandb"

    @staticmethod
    def benchmark_records(name: str, role: str) -> str:
        """Per-item records of one model ('base' or 'tuned', or a model label) on one benchmark."""
        return posixpath.join(RunPaths.benchmarks, name, f"{role}.jsonl")

    @staticmethod
    def benchmark_summary(name: str, role: str) -> str:
        """Score, stderr, n and every setting of one model on one benchmark (no records)."""
        return posixpath.join(RunPaths.benchmarks, name, f"{role}.summary.json")

    @staticmethod
    def benchmark_lm_eval(name: str, role: str, filename: str) -> str:
        """lm-eval's own results_<date>.json / samples_<task>_<date>.jsonl of one model on one benchmark."""
        return posixpath.join(RunPaths.benchmarks, name, "lm-eval", role, filename)

    @staticmethod
    def section(name: str) -> str:
        """A stage's own report section (markdown); report.md stitches them in SECTIONS order."""
        return posixpath.join(RunPaths.sections, f"{name}.md")


# Report sections in the order report.md shows them; each is written by the stage named.
SECTIONS = (
    ("summary", "Summary", "reporting"),
    ("links", "Links", "reporting"),
    ("config", "Configuration", "reporting"),
    ("data", "Data", "data, tokenization"),
    ("template", "Chat template", "templates"),
    ("training", "Training", "training"),
    ("health", "Training health", "health"),
    ("benchmarks", "Benchmarks (base vs tuned)", "evaluation"),
    ("judge", "Judge (tuned vs reference)", "judge"),
    ("trend", "Score trend", "trends"),
    ("gate", "Regression gate", "gate"),
    ("samples", "Samples (greedy)", "generation"),
)
