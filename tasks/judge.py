"""LLM-as-judge: AlpacaEval-style pairwise win rate of the tuned model's answers against a
reference's (the base model's answers, or AlpacaEval reference outputs).

Scheme (AlpacaEval's preference encoding: 1 = reference better, 2 = tuned better, 1.5 = tie):
- The prompt is AlpacaEval's own `chatgpt` comparison template, which asks for exactly
  "Output (a)" or "Output (b)": a forced choice, as in AlpacaEval.
- Every pair is judged twice, tuned as (a) and tuned as (b). Both orders agreeing give 1 or 2;
  disagreeing gives a tie (1.5): a judge that always picks the same position thus cancels out.
- A verdict naming neither output is a parse failure, counted and reported. A pair with a parse
  failure in either order is left out of the win rate (preference None, not in `n`): counting it
  a loss would punish the tuned model for the judge's failure, and keeping the one parsed order
  would bring back the position bias that judging both orders removes.
- The win rate and its standard error come from `alpaca_eval.metrics.get_winrate` (percent,
  ties count half), so the arithmetic is AlpacaEval's.

Every judgement (one order of one pair) is cached on disk, keyed by sha256 of the judge's
identity, the template text, the verdict length, the instruction and both outputs in order:
re-runs never re-judge, and a cached verdict is reproducible (alpaca_eval issue 382).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.code_version import computed_by
from tasks.config import JudgeConfig
from tasks.console import keep_root_level
from tasks.judge_backends import JudgeBackend, make_backend, redact_url
from tasks.models import ModelRef, resolve_source
from tasks.layout import RunPaths
from tasks.runtime import FIXTURES, atomic_write, cache_dir, retry_transient, run_logger
from tasks.yamlfile import KeyTwice, json_list_items, json_loads, read_text
from tasks.storage import ArtifactStore

TEMPLATE_NAME = "alpaca_eval:chatgpt/basic_prompt.txt"
CHUNK = 16  # verdicts per backend call (the local backend batches 8 at a time within it)
VERDICT_TOKENS = 32  # "Output (a)" is 4 tokens; room for a preamble, as AlpacaEval's 50
FIXTURE_INSTRUCTIONS = FIXTURES / "judge" / "instructions.jsonl"
FIXTURE_REFERENCES = FIXTURES / "judge" / "reference_outputs.jsonl"
LC_NOTE = (
    "lc_win_rate: not computed. AlpacaEval's length-controlled win rate fits a GLM whose "
    "baseline weights come from a hub file; offline it cannot be computed, and it is never faked."
)

# A verdict is the first explicit mention of an output: "Output (a)", "output b.", "(b)", "[a]";
# or the whole answer being one letter, e.g. "b", "**Output a**", "Answer: (a)". A bare "a"
# inside a sentence is an article, not a verdict.
_WHOLE = re.compile(r"^\W*(?:(?:the\s+)?(?:answer|verdict|best|better|output|is)\W*)*([ab])\W*$", re.IGNORECASE)
_MARKED = re.compile(
    r"\boutput\s*[(\[]\s*([ab])\s*[)\]]"  # Output (a), output[b]
    r"|\boutput\s+([ab])(?=\s*(?:[.,;:!\n]|$))"  # Output b.
    r"|[(\[]([ab])[)\]]",  # (a)
    re.IGNORECASE,
)


class JudgeResult(BaseModel):
    """Pairwise win rate of the tuned model against the reference, AlpacaEval-style."""

    name: str = "judge"
    win_rate: float | None  # percent (AlpacaEval's unit); ties count half; None: no pair judged
    stderr: float | None  # standard error of the win rate, percent; None for fewer than two pairs
    n: int  # pairs in the win rate (both orders parsed)
    pairs: int  # pairs judged, including those left out for a parse failure
    wins: int
    ties: int
    losses: int
    parse_failures: int  # verdicts (of 2 per pair) that named neither output
    lc_win_rate: float | None = None
    stderr_note: str | None = None  # why stderr is n/a: too few pairs, or every pair tied
    note: str | None = None  # e.g. that the built-in 135M model is a weak judge
    records: list[dict[str, Any]]
    settings: dict[str, Any]
    seconds: float


def template_text() -> str:
    # Located, not imported: importing alpaca_eval costs ~3 s and the template is a plain file.
    root = Path(importlib.util.find_spec("alpaca_eval").submodule_search_locations[0])
    return (root / "evaluators_configs" / "chatgpt" / "basic_prompt.txt").read_text(encoding="utf-8")


def conversation(template: str, instruction: str, output_a: str, output_b: str) -> list[dict]:
    """The judging prompt as chat messages, with the texts filled in after the ChatML split
    (so an answer containing ChatML markers cannot change the message structure)."""
    with warnings.catch_warnings(), keep_root_level():  # alpaca_eval: pkg_resources warning, root logger at INFO
        warnings.simplefilter("ignore")
        from alpaca_eval.utils import prompt_to_chatml

    fill = {"{instruction}": instruction, "{output_1}": output_a, "{output_2}": output_b}
    pattern = re.compile("|".join(re.escape(k) for k in fill))
    return [m | {"content": pattern.sub(lambda k: fill[k.group(0)], m["content"])} for m in prompt_to_chatml(template)]


def parse_verdict(raw: str) -> str | None:
    """'a', 'b', or None when the judge's answer names neither output."""
    text = raw.strip()
    whole = _WHOLE.match(text)
    if whole:
        return whole.group(1).lower()
    marked = _MARKED.search(text)
    return next(g for g in marked.groups() if g).lower() if marked else None


def preference(tuned_as_a: str | None, tuned_as_b: str | None) -> float | None:
    """AlpacaEval preference of one pair from its two verdicts (None: a parse failure)."""
    if tuned_as_a is None or tuned_as_b is None:
        return None
    first = 2.0 if tuned_as_a == "a" else 1.0
    second = 2.0 if tuned_as_b == "b" else 1.0
    return first if first == second else 1.5


def win_rate(preferences: list[float]) -> dict[str, Any]:
    """AlpacaEval's win rate (percent, ties half) and standard error over judged pairs."""
    if not preferences:
        return {"win_rate": None, "stderr": None, "n": 0, "wins": 0, "ties": 0, "losses": 0}
    # Kept per list of preferences: importing alpaca_eval costs ~1.5 s, and a cached re-run judges
    # the same pairs again (its verdicts come from the judgement cache).
    version = importlib.metadata.version("alpaca_eval")
    path = cache_dir("win-rates") / f"{hashlib.sha256(json.dumps([version, preferences]).encode()).hexdigest()}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    with warnings.catch_warnings(), keep_root_level():
        warnings.simplefilter("ignore")
        from alpaca_eval.metrics import get_winrate

    out = get_winrate([{"preference": p} for p in preferences])
    stderr = float(out["standard_error"])
    result = {
        "win_rate": float(out["win_rate"]),
        "stderr": None if math.isnan(stderr) else stderr,
        "n": int(out["n_total"]),
        "wins": int(out["n_wins"]),
        "ties": int(out["n_draws"]),
        "losses": int(out["n_wins_base"]),
    }
    atomic_write(path, json.dumps(result))
    return result


def judgement_key(identity: str, template: str, instruction: str, output_a: str, output_b: str) -> str:
    parts = [identity, template, VERDICT_TOKENS, instruction, output_a, output_b]
    if identity.startswith("local:"):  # a local judge's verdicts are also what smolflow's engine made of them
        parts.append(computed_by("tasks.judge_backends"))
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _cached(key: str) -> str | None:
    path = cache_dir("judgements") / f"{key}.json"
    # UTF-8 as atomic_write wrote it: the locale's encoding (latin-1, say) returned mojibake.
    return json.loads(path.read_text(encoding="utf-8"))["raw"] if path.exists() else None


def _store(key: str, identity: str, raw: str) -> None:
    path = cache_dir("judgements") / f"{key}.json"
    atomic_write(path, json.dumps({"identity": identity, "raw": raw}, ensure_ascii=False))


def judge(
    backend: JudgeBackend, instructions: list[str], outputs: list[str], references: list[str],
    settings: dict[str, Any] | None = None,
) -> JudgeResult:
    """Judge every pair in both orders (cached verdicts reused) and compute the win rate."""
    if not len(instructions) == len(outputs) == len(references):
        raise ValueError(
            f"judge: {len(instructions)} instructions, {len(outputs)} outputs and {len(references)} "
            "references: pass one output and one reference per instruction"
        )
    started = time.perf_counter()
    template = template_text()
    # Per pair, two jobs: (instruction, tuned as (a), reference as (b)), then the other way round.
    jobs = [job for ins, out, ref in zip(instructions, outputs, references)
            for job in ((ins, out, ref), (ins, ref, out))]
    keys = [judgement_key(backend.identity, template, *job) for job in jobs]
    raws = [_cached(k) for k in keys]
    todo = [j for j, raw in enumerate(raws) if raw is None]
    if todo:
        run_logger().info("Judging %d of %d verdicts (%d cached) with %s",
                          len(todo), len(raws), len(raws) - len(todo), backend.identity)
    # In chunks, each stored as it comes back: a failure (or a retry) loses one chunk's verdicts at most.
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        answers = backend.chat([conversation(template, *jobs[j]) for j in chunk], VERDICT_TOKENS)
        for j, raw in zip(chunk, answers, strict=True):
            _store(keys[j], backend.identity, raw)
            raws[j] = raw
    records = []
    for i, (ins, out, ref) in enumerate(zip(instructions, outputs, references)):
        raw_a, raw_b = raws[2 * i], raws[2 * i + 1]
        parsed_a, parsed_b = parse_verdict(raw_a), parse_verdict(raw_b)
        records.append({
            "instruction": ins, "output": out, "reference_output": ref,
            "verdict_tuned_as_a": raw_a, "verdict_tuned_as_b": raw_b,
            "parsed_tuned_as_a": parsed_a, "parsed_tuned_as_b": parsed_b,
            "preference": preference(parsed_a, parsed_b),
        })
    judged = [r["preference"] for r in records if r["preference"] is not None]
    failures = sum((r["parsed_tuned_as_a"] is None) + (r["parsed_tuned_as_b"] is None) for r in records)
    settings = (settings or {}) | {
        "judge_identity": backend.identity,
        "template": TEMPLATE_NAME,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "verdict_max_new_tokens": VERDICT_TOKENS,
        "scheme": "both orders per pair; agree -> 1 or 2, disagree -> 1.5 (tie); "
                  "a parse failure in either order leaves the pair out of the win rate",
        "lc_win_rate": LC_NOTE,
    }
    rate = win_rate(judged)
    # AlpacaEval's standard error means little on a handful of pairs, and is 0 when every pair is a
    # tie (a judge that always names one position): shown as n/a with the reason instead.
    why = ("fewer than 10 pairs" if rate["n"] < MIN_PAIRS_FOR_STDERR else
           "every pair tied" if rate["n"] and rate["ties"] == rate["n"] else None)
    if why:
        rate["stderr"] = None
    return JudgeResult(**rate, stderr_note=why, note=weak_judge_note(backend.identity, settings),
                       pairs=len(records), parse_failures=failures, records=records,
                       settings=settings, seconds=round(time.perf_counter() - started, 2))


MIN_PAIRS_FOR_STDERR = 10
WEAK_JUDGE = ("weak judge: the built-in SmolLM2-135M-Instruct names the same position whatever the order, "
              "so nearly every pair is a tie and the win rate sits near 50%; point `judge` at a stronger model")


def weak_judge_note(identity: str, settings: dict[str, Any]) -> str | None:
    """The weak-judge warning when the judge is the built-in 135M model."""
    builtin = settings.get("backend") == "local" and settings.get("judge_model") in ("auto", "builtin:smollm2-135m-instruct")
    return WEAK_JUDGE if builtin else None


@task(retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=[10], cache_policy=NO_CACHE)
def judge_pairs(instructions: list[str], outputs: list[str], references: list[str], cfg: JudgeConfig,
                reference_model: dict[str, str] | None = None) -> JudgeResult:
    """Judge the tuned model's answers against the references, both orders, AlpacaEval win rate;
    `reference_model`: the model whose answers are the references (reference 'base')."""
    # Cached per judgement, not per task: a task-level key would hold the judge's *name*
    # (cfg.model), so a judge re-trained at the same path would replay stale verdicts.
    settings = {
        "backend": cfg.backend, "judge_model": cfg.model,
        "base_url": cfg.base_url and redact_url(cfg.base_url),
        "instructions": cfg.instructions, "limit": cfg.limit, "reference": cfg.reference,
        "reference_model": reference_model, "max_new_tokens": cfg.max_new_tokens,
    }
    return judge(make_backend(cfg), instructions, outputs, references, settings)


def _rows(path: Path, field: str) -> list[tuple[str, dict]]:
    """(where, row) of a .json list or .jsonl file, each checked for a non-empty `instruction`."""
    if not path.is_file():
        raise ValueError(f"judge.{field}: {path} is not a file; give a .json/.jsonl file in AlpacaEval's schema")
    text = read_text(path, ValueError)
    whole = path.suffix == ".json" and text.lstrip().startswith("[")  # AlpacaEval's own files: one JSON list
    rows, lineno = [], 0
    try:
        if whole:
            rows = [(f"{path} item {i} (line {line})", row) for i, (line, row) in enumerate(json_list_items(text), 1)]
        else:
            for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
                if line.strip():
                    rows.append((f"{path} line {lineno}", json_loads(line)))
    except KeyTwice as err:
        raise ValueError(f"judge.{field}: {path}{'' if whole else f' line {lineno}'}: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"judge.{field}: {path} line {err.lineno if whole else lineno} is not valid JSON "
                         f"({err.msg}); fix or remove that line") from None
    if not rows:
        raise ValueError(f"judge.{field}: {path} has no rows; add rows like {{\"instruction\": \"...\"}}")
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ValueError(f"judge.{field}: {where} has no non-empty `instruction` string; "
                             'each row needs {"instruction": "..."} (AlpacaEval\'s schema)')
    return rows


def load_instructions(cfg: JudgeConfig, sample_prompts: list[str]) -> list[str]:
    """The instructions to judge on, limited to cfg.limit."""
    if cfg.instructions == "samples":
        instructions = list(sample_prompts)
    else:
        path = FIXTURE_INSTRUCTIONS if cfg.instructions == "fixture" else Path(cfg.instructions).expanduser()
        instructions, first = [], {}
        for where, row in _rows(path, "instructions"):
            # The same instruction gets the same greedy answers and verdicts: twice, it would count twice
            # in the win rate's n and shrink its stderr.
            if (earlier := first.setdefault(row["instruction"], where)) is not where:
                raise ValueError(f"judge.instructions: {where} repeats the instruction of {earlier} (it would be "
                                 "judged, and counted, twice); remove one")
            instructions.append(row["instruction"])
    return instructions[: cfg.limit] if cfg.limit else instructions


def load_references(path: Path, instructions: list[str]) -> tuple[list[str], list[str]]:
    """(outputs, generators) from an AlpacaEval reference-outputs file, matched by instruction."""
    by_instruction: dict[str, dict] = {}
    for where, row in _rows(path, "reference"):
        # An empty reference answer loses to any answer: the win rate would measure nothing.
        if not isinstance(row.get("output"), str) or not row["output"].strip():
            raise ValueError(f"judge.reference: {where} has no non-empty `output` string; each row needs "
                             '{"instruction": "...", "output": "..."} (AlpacaEval\'s reference outputs)')
        by_instruction.setdefault(row["instruction"], row)  # the first answer to an instruction counts
    missing = [ins for ins in instructions if ins not in by_instruction]
    if missing:
        shown = "; ".join(repr(m[:80]) for m in missing[:3])
        shown += f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"judge.reference: {path} has no output for {len(missing)} of {len(instructions)} "
                         f"instructions ({shown}); add rows for them, or judge against reference 'base'")
    rows = [by_instruction[ins] for ins in instructions]
    return [r["output"] for r in rows], sorted({str(r.get("generator", "unknown")) for r in rows})


def judge_inputs(cfg: JudgeConfig, sample_prompts: list[str]) -> tuple[list[str], list[str] | None]:
    """(instructions, reference outputs or None for 'base'): reads and checks the files, runs no
    model, so a flow can call it first and fail before any training on a broken file."""
    instructions = load_instructions(cfg, sample_prompts)
    if cfg.reference == "base":
        return instructions, None
    return instructions, load_references(Path(cfg.reference).expanduser(), instructions)[0]


def run_judge(base: ModelRef, tuned: ModelRef, cfg: JudgeConfig, sample_prompts: list[str],
              sample_max_new_tokens: int) -> JudgeResult | None:
    """Answers of the tuned model (and of the base model, when it is the reference), judged;
    judge.max_new_tokens None: sampling.max_new_tokens (recorded as used in the judge's settings)."""
    from tasks.generation import generate_samples

    if not cfg.enabled:
        return None
    if cfg.max_new_tokens is None:
        cfg = cfg.model_copy(update={"max_new_tokens": sample_max_new_tokens})
    instructions, references = judge_inputs(cfg, sample_prompts)
    # generate_samples is a cached task: with judge.max_new_tokens == sampling.max_new_tokens and
    # instructions 'samples', these are the run's own before/after samples, not a second generation.
    outputs = [s.completion for s in generate_samples(tuned, instructions, cfg.max_new_tokens, role="judged")]
    reference_model = None
    if references is None:
        references = [s.completion for s in generate_samples(base, instructions, cfg.max_new_tokens,
                                                             role="reference")]
        # 'base' is the run's base model in a fine-tune, the default model in smolflow eval: which
        # model answered is recorded, or two win rates "against base" read alike whatever it was;
        # by its concrete source ('auto' says nothing once the hub's reachability changes).
        reference_model = {"source": resolve_source(base.source), "path": base.path, "fingerprint": base.fingerprint}
    return judge_pairs(instructions, outputs, references, cfg, reference_model)


def _short(text: str | None, limit: int = 300) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def judge_markdown(judge: JudgeResult | None, skipped: str = "judge.enabled: false") -> str:
    """Win rate with its counts and settings, and a few pairs; the rest is in judge/pairs.jsonl.
    Not run: `skipped` says why."""
    if judge is None:
        return f"Not run ({skipped}).\n"
    s = judge.settings
    rate = "n/a (no pair judged in both orders)" if judge.win_rate is None else (
        f"**{judge.win_rate:.1f}%**" + (f" ± {judge.stderr:.1f}" if judge.stderr is not None
                                         else f" ± n/a ({judge.stderr_note or 'too few pairs'})"))
    head = (
        f"Win rate of the tuned model against {s.get('reference')!r}"
        + (f" (the answers of {ref['source']!r}, fingerprint {ref['fingerprint'][:12]})"
           if (ref := s.get("reference_model")) else "")
        + f": {rate} (AlpacaEval's definition: ties count "
        f"half) · n={judge.n} of {judge.pairs} pairs · {judge.wins} win / {judge.ties} tie / {judge.losses} loss · "
        f"{judge.parse_failures} unparseable verdict(s) · judge `{s.get('judge_identity')}` · both orders judged per pair · "
        f"length-controlled: {'n/a' if judge.lc_win_rate is None else f'{judge.lc_win_rate:.1f}%'}\n\n"
    )
    rows = "".join(
        f"| {_cell(r['instruction'][:120])} | {_cell((r['output'] or '')[:160])} | "
        f"{_cell((r['reference_output'] or '')[:160])} | {r['preference']} |\n"
        for r in judge.records[:5]
    )
    if judge.note:  # e.g. the built-in 135M judge: nearly every pair a tie
        head = f"**Note: {judge.note}.**\n\n" + head
    return head + "| instruction | tuned | reference | preference (2 = tuned better, 1.5 = tie) |\n|---|---|---|---|\n" + rows


def write_judge(run: ArtifactStore, result: JudgeResult | None, skipped: str = "judge.enabled: false") -> None:
    """The judged pairs, the summary and the report's judge section in the run folder, and a Prefect
    table artifact; not run (None): the section says why (`skipped`)."""
    run.write_text(RunPaths.section("judge"), judge_markdown(result, skipped))
    if result is None:
        return
    run.write_text(RunPaths.judge_pairs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
    run.write_json(RunPaths.judge_summary, result.model_dump(exclude={"records"}))
    table = [
        {"instruction": _short(r["instruction"]), "tuned": _short(r["output"]),
         "reference": _short(r["reference_output"]), "verdict (tuned as a)": _short(r["verdict_tuned_as_a"], 80),
         "verdict (tuned as b)": _short(r["verdict_tuned_as_b"], 80), "preference": r["preference"]}
        for r in result.records
    ]
    rate = "n/a" if result.win_rate is None else f"{result.win_rate:.1f}%"
    create_table_artifact(
        key="smolflow-judge", table=table,
        description=(f"{result.note}. " if result.note else "") +
                    f"Judge win rate {rate} (n={result.n}, {result.wins}/{result.ties}/{result.losses} "
                    f"win/tie/loss, {result.parse_failures} unparsed verdicts); 1 = reference better, "
                    "2 = tuned better, 1.5 = tie, empty = left out (parse failure)",
    )
