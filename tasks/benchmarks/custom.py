"""Custom benchmarks: a small YAML or JSON definition next to a JSONL file of items.

```yaml
name: capitals            # [a-z0-9_-]+; results go to benchmarks/custom/<name>/
data: capitals.jsonl      # JSONL, one item per line; relative to this file (or absolute)
prompt_field: prompt      # the item's prompt text (default "prompt"); or instead:
# messages_field: messages  # a chat list [{role, content}, ...] ending with a user turn
answer_field: answer      # a string, a number, or a list of acceptable answers
scorer: normalized_match  # exact_match | normalized_match | contains | regex | numeric | math_verify | judge_rubric
scorer_args: {}           # contains: {case_sensitive}; regex: {pattern, group: 1, ignore_case: true};
                          # numeric: {tolerance: 0, relative: false}; judge_rubric: {rubric, max_new_tokens: 16}
chat_template: true       # render prompts through the model's chat template (false: raw text prompts)
system_prompt: null       # a system message before each prompt (chat_template only)
max_new_tokens: 64
stop: []                  # stop strings: the output is cut before the first one
limit: null               # score only the first N items
batch_size: 8
description: null         # free text, recorded with the results
```

`load_definition` checks everything before any model runs (every key, the scorer and its
arguments, every item's JSON, fields and types, and that each gold can be matched by the
scorer) and raises `CustomBenchmarkError` naming the file, the line and the fix.
`run_custom_benchmark` is the cached Prefect task; its cache key is the model's fingerprint and
the benchmark's `fingerprint` (its scored settings + its items + this code), never a path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.yamlfile import KeyTwice, at, json_loads, key_lines, read_text, yaml_error
from tasks.config import JudgeConfig
from tasks.benchmarks import scorers
from tasks.benchmarks.base import BenchmarkResult, stderr_of_mean
from tasks.models import ModelRef, load_model
from tasks.caching import CODE, ContentInputs
from tasks.runtime import retry_transient, run_logger

DOCS = "docs/benchmarks.md#custom-benchmarks"
ROLES = ("system", "user", "assistant")
# Scoring code is part of what a cached result is: edit a scorer and every custom result is redone.
CODE_VERSION = hashlib.sha256(Path(scorers.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()


# What generates and scores the answers: tasks/generation.py's engine since 2026-12-03 (e1a038c), when
# the label still said transformers' generate and the key left it out, so scores of both engines
# (transformers' stop_strings also matched across the prompt's end) shared one key. In the key now,
# as HumanEval's: name the new engine here when it changes.
ENGINE = "smolflow-hf greedy (tasks/generation.py on tasks/benchmarks/fast_lm.py) + tasks/benchmarks/scorers.py"


class CustomBenchmarkError(ValueError):
    """A broken custom benchmark definition or item file (the message names file, line and fix)."""


class Definition(BaseModel):
    """What a definition file may hold (unknown keys are errors, types are not coerced)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64)
    data: str = Field(min_length=1)
    prompt_field: str | None = None
    messages_field: str | None = None
    answer_field: str = "answer"
    scorer: str
    scorer_args: dict[str, Any] = Field(default_factory=dict)
    chat_template: bool = True
    system_prompt: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=4096)
    stop: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    description: str | None = None


class Item(BaseModel):
    line: int  # in the JSONL file, for records and error messages
    prompt: str | list[dict[str, str]]
    golds: list[str | int | float]  # any one of them is a right answer


class CustomBenchmark(Definition):
    """A checked definition with its items, ready to score."""

    path: str  # the definition file
    data_path: str  # the item file, resolved
    items: list[Item]
    fingerprint: str  # sha256 of scored settings + items + scoring code: the cache key (see fingerprint)

    def selected(self) -> list[Item]:
        return self.items[: self.limit] if self.limit else self.items

    def conversation(self, item: Item) -> str | list[dict[str, str]]:
        """What the model is given: raw text, or messages for the chat template."""
        if not self.chat_template:
            return item.prompt
        messages = [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else list(item.prompt)
        if self.system_prompt and messages[0]["role"] != "system":  # an item's own system message wins
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def question(self, item: Item) -> str:
        """The item's question as text (for the judge): the prompt, or the last user message."""
        if isinstance(item.prompt, str):
            return item.prompt
        return [m["content"] for m in item.prompt if m["role"] == "user"][-1]


# --- loading and checking ---------------------------------------------------------------------


_REQUIRED = {  # what to write for a missing required key
    "name": "my_benchmark  (lowercase letters, digits, _ and -)",
    "data": "items.jsonl  (next to this file)",
    "scorer": "one of " + " | ".join(scorers.SCORERS),
}


def _explain(err: dict, allowed: list[str]) -> str:
    """A pydantic error as 'field: problem; fix'."""
    field = ".".join(str(p) for p in err["loc"]) or "definition"
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"missing required key `{field}`: add `{field}: {_REQUIRED.get(field, '...')}` (see {DOCS})"
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
        return f"unknown key `{field}`: {hint}allowed keys: {', '.join(allowed)}"
    if kind == "value_error":  # smolflow's own checks: the message already says what to do
        return f"{field}: {msg}"
    return f"{field}: {msg[:1].lower()}{msg[1:]}, got {err.get('input')!r}; change the value (see {DOCS})"


def _parse(path: Path) -> tuple[Any, dict[tuple, int]]:
    text = read_text(path, CustomBenchmarkError)
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise CustomBenchmarkError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the syntax"
        ) from None
    except yaml.YAMLError as err:
        raise CustomBenchmarkError(yaml_error(str(path), err)) from None
    if not isinstance(raw, dict):
        raise CustomBenchmarkError(
            f"{path}: the definition must be a mapping of keys (name, data, scorer, ...), "
            f"got {type(raw).__name__}; see {DOCS}"
        )
    return raw, key_lines(text, str(path), CustomBenchmarkError)


def _check_fields(d: Definition) -> list[tuple[tuple, str]]:
    """Rules between keys, and the scorer and its arguments: [(location, problem)]."""
    problems = []
    if d.scorer not in scorers.SCORERS:
        near = difflib.get_close_matches(d.scorer, list(scorers.SCORERS), n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
        known = ", ".join(scorers.SCORERS)
        problems.append((("scorer",), f"scorer: unknown scorer {d.scorer!r}; {hint}use one of {known}"))
    else:
        try:
            scorers.ARGS[d.scorer].model_validate(d.scorer_args)
        except ValidationError as err:
            allowed = list(scorers.ARGS[d.scorer].model_fields) or ["(none)"]
            for e in err.errors():
                e = e | {"loc": ("scorer_args", *e["loc"])}
                problems.append((e["loc"], _explain(e, allowed) + f" [scorer {d.scorer}]"))
    if d.prompt_field and d.messages_field:
        problems.append((("messages_field",), "set prompt_field or messages_field, not both; remove one"))
    if d.messages_field and not d.chat_template:
        problems.append((("chat_template",), "messages_field needs chat_template: true (a chat has no raw form)"))
    if d.system_prompt and not d.chat_template:
        problems.append((("system_prompt",), "system_prompt needs chat_template: true; or write it into each prompt"))
    if any(not s for s in d.stop):
        problems.append((("stop",), "stop: empty stop string; remove it"))
    return problems


def _check_item(raw: Any, d: Definition) -> tuple[Item | None, str | None]:
    """An item from one parsed JSONL line, or why it is unusable."""
    if not isinstance(raw, dict):
        return None, f"each line must be a JSON object, got {type(raw).__name__}"
    field = d.messages_field or d.prompt_field or "prompt"
    if field not in raw:
        key = "messages_field" if d.messages_field else "prompt_field"
        return None, f"no `{field}` ({key}); keys present: {sorted(raw)}; add it or set {key} to the right key"
    prompt = raw[field]
    if d.messages_field:
        if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt
        )):
            return None, f"`{field}` must be a non-empty list of {{\"role\": {'|'.join(ROLES)}, \"content\": text}}"
        if prompt[-1]["role"] != "user":
            return None, f"`{field}` must end with a user message (the model answers it)"
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif not (isinstance(prompt, str) and prompt.strip()):
        return None, f"`{field}` must be non-empty text, got {prompt!r}"
    if d.answer_field not in raw:
        return None, f"no `{d.answer_field}` (answer_field); keys present: {sorted(raw)}; add it or set answer_field"
    gold = raw[d.answer_field]
    golds = gold if isinstance(gold, list) else [gold]
    if not golds or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in golds):
        return None, f"`{d.answer_field}` must be text, a number, or a non-empty list of them, got {gold!r}"
    for g in golds:
        if why := scorers.gold_problem(d.scorer, g):
            return None, f"`{d.answer_field}`: {why}"
    return Item(line=0, prompt=prompt, golds=golds), None


def _read_items(path: Path, d: Definition, where: str) -> list[Item]:
    items, problems = [], []
    first_line: dict[str, int] = {}  # prompt -> the line it is first on
    # Lines end at "\n" only: str.splitlines would also split inside JSON strings holding U+2028.
    for number, text in enumerate(read_text(path, CustomBenchmarkError).split("\n"), start=1):
        if not text.strip():
            continue  # blank lines (a trailing newline, spacing) are not items
        try:
            raw = json_loads(text)
        except KeyTwice as err:
            problems.append(f"{path}:{number}: {err}")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one complete JSON object")
            continue
        item, why = _check_item(raw, d)
        if why:
            problems.append(f"{path}:{number}: {why}")
            continue
        # Greedy decoding answers a prompt the same way each time: an item twice (a file appended to
        # itself) would count twice in n and shrink the stderr the gate and "beyond noise" rely on.
        prompt = json.dumps(item.prompt, sort_keys=True)
        if prompt in first_line:
            problems.append(f"{path}:{number}: the same prompt as line {first_line[prompt]} (it would be scored, and "
                            "counted, twice); remove one, or give that line a list of acceptable answers")
            continue
        first_line[prompt] = number
        items.append(item.model_copy(update={"line": number}))
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CustomBenchmarkError(f"{len(problems)} bad item(s) for {where}:\n  " + "\n  ".join(problems[:10]) + more)
    if not items:
        raise CustomBenchmarkError(
            f"{path}: no items (the file is empty or blank); add one JSON object per line (data: in {where})"
        )
    return items


def load_definition(path: str | Path) -> CustomBenchmark:
    """Read and check a custom benchmark definition and its items; every problem names file and line."""
    path = Path(path).expanduser()
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise CustomBenchmarkError(f"{path}: a custom benchmark definition is a .yaml, .yml or .json file")
    if not path.is_file():
        raise CustomBenchmarkError(f"{path}: no such file; check the path in custom_benchmarks")
    raw, lines = _parse(path)
    allowed = list(Definition.model_fields)
    try:
        d = Definition.model_validate(raw)
    except ValidationError as err:
        found = [f"{at(str(path), lines, e['loc'])}: {_explain(e, allowed)}" for e in err.errors()]
        raise CustomBenchmarkError("\n".join(found)) from None
    if problems := _check_fields(d):
        raise CustomBenchmarkError("\n".join(f"{at(str(path), lines, loc)}: {msg}" for loc, msg in problems))
    data = Path(d.data).expanduser()
    data = (data if data.is_absolute() else path.parent / data).resolve()
    if not data.is_file():
        raise CustomBenchmarkError(
            f"{at(str(path), lines, ('data',))}: data file {d.data!r} not found (looked for {data}); "
            "the path is relative to the definition file"
        )
    items = _read_items(data, d, f"{path}:{lines.get(('data',), 1)}")
    args = scorers.ARGS[d.scorer].model_validate(d.scorer_args).model_dump()  # defaults filled in, recorded
    return CustomBenchmark(**(d.model_dump() | {"scorer_args": args}), path=str(path.resolve()), data_path=str(data),
                           items=items, fingerprint=fingerprint(d.model_dump() | {"scorer_args": args}, items))


# Not in the fingerprint: what changes no answer and no score. The items are hashed as read (prompt,
# answers), so the fields naming where they are, a moved file and a reformatted line leave it too.
UNSCORED = ("description", "name", "data", "prompt_field", "messages_field", "answer_field")


def fingerprint(definition: dict[str, Any], items: list[Item]) -> str:
    """The cache key and comparability data of a benchmark: what it asks and how it scores (its
    settings, its items, the scoring code). The file's bytes were hashed: an edited description or
    comment made an identical measurement 'not comparable' to the promoted model's."""
    what = {"definition": {k: v for k, v in definition.items() if k not in UNSCORED},
            "items": [[item.prompt, item.golds] for item in items], "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def load_definitions(paths: list[str]) -> list[CustomBenchmark]:
    """Every definition of a run, checked, with names unique (they name the result folders)."""
    benches = [load_definition(p) for p in paths]
    seen: dict[str, str] = {}
    for b in benches:
        if b.name in seen:
            raise CustomBenchmarkError(f"{b.path}: name {b.name!r} is already used by {seen[b.name]}; rename one")
        seen[b.name] = b.path
    return benches


# --- scoring ----------------------------------------------------------------------------------


def check_judge_enabled(paths: list[str], judge_enabled: bool) -> None:
    """A judge_rubric benchmark asks the run's judge; with judge.enabled: false it would still load
    and run it, so a setting that says "no judge" is refused rather than silently ignored."""
    if judge_enabled:
        return
    for i, bench in enumerate(load_definitions(paths)):
        if bench.scorer == "judge_rubric":
            raise CustomBenchmarkError(
                f"custom_benchmarks[{i}] ({bench.path}): scorer judge_rubric needs the judge, but judge.enabled "
                "is false; set judge.enabled: true, or give this benchmark another scorer")


def score_outputs(bench: CustomBenchmark, outputs: list[str], judge=None) -> tuple[list[dict], dict[str, float]]:
    """Per-item records and metrics for model outputs, one per selected item, in order."""
    items, args = bench.selected(), bench.scorer_args
    if len(outputs) != len(items):
        raise ValueError(f"custom/{bench.name}: {len(outputs)} outputs for {len(items)} items")
    extract = scorers.EXTRACTORS[bench.scorer]
    records = [
        {
            "doc_id": item.line,
            "prompt": item.prompt,
            "output": output,
            "extracted": extract(output, **args),
            "gold": item.golds[0] if len(item.golds) == 1 else item.golds,
        }
        for item, output in zip(items, outputs)
    ]
    metrics: dict[str, float] = {}
    if bench.scorer == "judge_rubric":
        if judge is None:
            raise CustomBenchmarkError(f"{bench.path}: scorer judge_rubric needs a judge backend (make_backend)")
        verdicts = scorers.judge_verdicts(
            judge, [bench.question(i) for i in items], outputs, ["; ".join(map(str, i.golds)) for i in items],
            args["rubric"], args["max_new_tokens"],
        )
        for record, (reply, verdict) in zip(records, verdicts):
            # An unparseable verdict is a failure, and counted so a weak judge shows up as one.
            record |= {"correct": verdict is True, "judge_reply": reply,
                       "verdict": {True: "PASS", False: "FAIL", None: None}[verdict]}
        metrics["unparseable"] = float(sum(v is None for _, v in verdicts))
    else:
        score = scorers.SCORERS[bench.scorer]
        for record, item in zip(records, items):
            record["correct"] = any(score(record["output"], g, **args) for g in item.golds)
    metrics[bench.scorer] = sum(r["correct"] for r in records) / len(records)
    return records, metrics


def evaluate_custom(model, tokenizer, bench: CustomBenchmark, judge_cfg: JudgeConfig | None = None) -> BenchmarkResult:
    """Score a loaded model on a custom benchmark: batched greedy generation, then the scorer."""
    from tasks.generation import generate

    started = time.perf_counter()
    if bench.chat_template and not tokenizer.chat_template:
        raise CustomBenchmarkError(
            f"{bench.path}: chat_template is true but the model's tokenizer has no chat template; "
            "set chat_template: false (raw prompts) or use a model with one"
        )
    items = bench.selected()
    samples = generate(model, tokenizer, [bench.conversation(i) for i in items], bench.max_new_tokens,
                       bench.batch_size, chat_template=bench.chat_template, stop=bench.stop or None)
    judge = None
    if bench.scorer == "judge_rubric":
        from tasks.judge import make_backend  # loads a model or opens a client: only when asked for

        judge = make_backend(judge_cfg or JudgeConfig())
    records, metrics = score_outputs(bench, [s.completion for s in samples], judge)
    run_logger().info("custom/%s: %d/%d correct (%s)", bench.name, sum(r["correct"] for r in records),
                      len(records), bench.scorer)
    from tasks.benchmarks.provenance import arrangement, custom_provenance

    dtype, how = str(model.dtype).removeprefix("torch."), arrangement(model, bench.batch_size)
    return BenchmarkResult(
        **custom_provenance(bench, records, judge.identity if judge is not None else None, dtype, how, ENGINE),
        name=f"custom/{bench.name}",
        score=metrics[bench.scorer],
        stderr=stderr_of_mean([float(r["correct"]) for r in records]),
        n=len(records),
        metric=bench.scorer,
        settings=bench.model_dump(exclude={"items"}) | {
            "engine": ENGINE,
            "items_in_file": len(bench.items),
            "judge": judge.identity if judge is not None else None,
            "dtype": dtype,
        } | how,
        metrics=metrics,
        records=records,
        seconds=time.perf_counter() - started,
    )


@dataclass
class JudgeIdentity(CachePolicy):
    """What the judge of a judge_rubric benchmark is (its model's content, or endpoint and model):
    judge.model names a path or 'auto', whose model can change under the same name."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        from tasks.judge_backends import judge_identity

        judge = (inputs or {}).get("judge_cfg")
        return judge_identity(judge) if judge is not None else None


@task(cache_policy=(ContentInputs() - "role") + JudgeIdentity() + CODE, retries=1,
      retry_condition_fn=retry_transient,
      retry_delay_seconds=10, task_run_name="custom-{bench.name}-{role}")
def run_custom_benchmark(
    model_ref: ModelRef, bench: CustomBenchmark, judge_cfg: JudgeConfig | None = None, role: str = "model"
) -> BenchmarkResult:
    """Score a model on a custom benchmark; cached on model and benchmark content and the settings."""
    model, tokenizer = load_model(model_ref)
    model.eval()
    return evaluate_custom(model, tokenizer, bench, judge_cfg)
