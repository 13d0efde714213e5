"""Chat-template stage: make sure the model has a template, and show what training will see.

A model with its own template (SmolLM2-Instruct's ChatML) keeps it. A template-less base model
gets ChatML through TRL's `clone_chat_template` (TRL 1.x dropped `setup_chat_format`), which
also makes `<|im_end|>` the EOS token so the tuned model learns to stop.
"""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from tasks.data import DatasetRef
from tasks.models import ModelRef, convert_builtin, fingerprint_dir, load_model
from tasks.runtime import BY_CONTENT, cache_dir, run_logger

class TemplatedModel(BaseModel):
    model: ModelRef
    template_source: str  # "model" or "chatml (cloned from ...)"
    rendered_example: str  # the first training conversation as the model will see it


@task(cache_policy=BY_CONTENT, retries=1)
def prepare_chat_template(base: ModelRef, data: DatasetRef) -> TemplatedModel:
    """Give the model a chat template if it lacks one and render one training example."""
    from datasets import load_from_disk

    model, tokenizer = load_model(base)
    source = "model"
    if not tokenizer.chat_template:
        from trl import clone_chat_template

        # The built-in SmolLM2-Instruct tokenizer carries ChatML and needs no network.
        chatml = convert_builtin()
        model, tokenizer, _ = clone_chat_template(model, tokenizer, str(chatml))
        target = cache_dir("models") / f"{base.fingerprint[:16]}-chatml"
        if not (target / "config.json").exists():
            staging = target.with_name(target.name + ".tmp")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        base = ModelRef(source=base.source, path=str(target), fingerprint=fingerprint_dir(target))
        source = f"chatml (cloned from {chatml.name})"
    example = load_from_disk(data.path)["train"][0]["messages"]
    rendered = tokenizer.apply_chat_template(example, tokenize=False)
    run_logger().info("Chat template: %s. First training example as rendered:\n%s", source, rendered)
    return TemplatedModel(model=base, template_source=source, rendered_example=rendered)
