"""What the Prefect UI shows: a description on every RunConfig field, none it strips as HTML,
progress lines with percent and ETA."""

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
