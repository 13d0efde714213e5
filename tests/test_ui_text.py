"""What the Prefect UI shows: a description on every RunConfig field, none it strips as HTML,
progress lines with percent and ETA."""

import pytest

from tasks.config import RunConfig
from tasks.progress import Progress


def _properties(schema: dict):
    yield from (("RunConfig", name, prop) for name, prop in schema["properties"].items())
    for model, definition in schema.get("$defs", {}).items():
        yield from ((model, name, prop) for name, prop in definition.get("properties", {}).items())


def test_every_field_has_a_description_the_ui_can_show():
    props = list(_properties(RunConfig.model_json_schema()))
    assert len(props) > 60  # every section is walked, the list items' models included
    missing = [f"{model}.{name}" for model, name, prop in props if not prop.get("description")]
    assert missing == []
    # The UI renders descriptions as HTML: '<run_id>' became an empty tag ("runs// goes below it").
    tags = [f"{model}.{name}" for model, name, prop in props if "<" in prop["description"]]
    assert tags == []


def test_the_training_section_says_what_it_is():
    doc = RunConfig.model_json_schema()["$defs"]["TrainingConfig"]["description"]
    assert "seed" not in doc.lower() and "SFTConfig" in doc


def test_progress_line_has_percent_and_eta():
    bar = Progress("k", "Training steps", 30)
    assert bar.line(0, "step 0 of 30") == "Training steps: 0% (step 0 of 30), ETA unknown"
    bar.started -= 40  # as if 40 s went by for 10 steps: 20 steps left take 80 s
    assert bar.line(10, "step 10 of 30") == "Training steps: 33% (step 10 of 30), ETA 1m20s"
    assert bar.line(30).startswith("Training steps: 100%, done in 40s")


def test_training_progress_prints_a_line_at_each_tenth_between_logging_steps(tmp_path, caplog):
    """Driven by transformers' own flow callback, as in the Trainer's loop: 30 steps logged every 5
    print a line at 0%, each tenth and 100% (steps 3, 6, 9, 12, ...), with the latest logged loss."""
    import logging

    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    from tasks.progress import training_progress

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, logging_steps=5, report_to=[])
    state, control = TrainerState(max_steps=30, logging_steps=5), TrainerControl()
    flow, progress = DefaultFlowCallback(), training_progress()
    logger = logging.getLogger("smolflow")
    logger.addHandler(caplog.handler)  # it may not propagate to the root logger caplog listens on
    with caplog.at_level(logging.INFO, logger="smolflow"):
        progress.on_train_begin(args, state, control)
        for step in range(1, 31):
            state.global_step = step
            control = flow.on_step_end(args, state, control)
            progress.on_step_end(args, state, control)
            if control.should_log:
                progress.on_log(args, state, control, logs={"loss": 3.0 - step / 10})
                control.should_log = False
            if step % 10 == 0:  # as the Trainer: a step's train loss is logged, then it evaluates
                progress.on_log(args, state, control, logs={"eval_loss": 2.6 - step / 100})
    logger.removeHandler(caplog.handler)
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training steps")))
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(p) for p in range(0, 101, 10)]
    # An eval loss is an earlier step's: said (the last line showed step 20's as if it were step 30's).
    assert lines[4].startswith("Training steps: 40% (step 12 of 30, train loss 2.0000, eval loss 2.5000 (step 10)), ETA")
    assert lines[-1].startswith("Training steps: 100% (step 30 of 30, train loss 0.0000, eval loss 2.4000 (step 20)), "
                                "done in")


def test_the_progress_artifact_ends_with_the_last_description_at_100_percent():
    """At 100% the final eval's log and "done" arrive after the last percent: the artifact shows them
    (it kept "step 4 of 4, eval loss <an earlier one>")."""
    from uuid import UUID

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    @flow
    def steps() -> str:
        bar = Progress("smolflow-test-progress", "Training steps", 4)
        for step in range(1, 5):
            bar.update(step, f"step {step} of 4")
        bar.update(4, "step 4 of 4, eval loss 2.5474")
        bar.update(4, "done: 4 steps")
        return str(bar.id)

    artifact_id = steps()
    with get_client(sync_client=True) as client:
        # By id: unfiltered, the server answers its first 200 of the session's artifacts, ours or not.
        ours = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)])))
    assert ours and ours[0].data == 100 and ours[0].description == "done: 4 steps"


def test_the_ui_form_takes_a_benchmark_profile_as_the_command_line_does():
    """The Prefect server checks a run's parameters against the flow's schema: 'published' was
    described there but refused ("is not valid under any of the given schemas")."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.finetune import finetune

    schema = parameter_schema(finetune.fn).model_dump_for_openapi()
    for ok in ("published", "published:/data/mirrors", [{"name": "gsm8k", "limit": 3}]):
        validate({"config": {"benchmarks": ok}}, schema, raise_on_error=True, ignore_required=True)
    with pytest.raises(ValidationError, match="config.benchmarks"):
        validate({"config": {"benchmarks": "nope"}}, schema, raise_on_error=True, ignore_required=True)


def test_the_ui_forms_default_lets_the_judge_follow_the_samples_and_be_switched_off():
    """The form's default (RunConfig()) carried judge.max_new_tokens: 100, filled in from sampling: a
    run from the UI with the judge unticked was refused for a field nobody set, and one with a shorter
    sampling.max_new_tokens judged at 100 tokens."""
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune
    from tasks.checks import resolve_autos
    from tasks.config import RunConfig

    schema = parameter_schema(finetune.fn).model_dump_for_openapi()
    form = schema["properties"]["config"]["default"]
    assert form["judge"]["max_new_tokens"] is None
    form["judge"]["enabled"] = False
    assert finetune.validate_parameters({"config": form})["config"].judge.enabled is False
    shorter = RunConfig.model_validate({"sampling": {"max_new_tokens": 20}})
    assert shorter.judge.max_new_tokens is None  # run_judge uses the samples' 20, recorded as resolved:
    assert resolve_autos(shorter)["judge.max_new_tokens"] == "20 (sampling.max_new_tokens)"
