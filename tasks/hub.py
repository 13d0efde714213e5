"""Push the tuned model to the Hugging Face hub (`output.push_to_hub`).

Everything a push needs (the hub reachable, a token) is checked by `check_hub` before any compute,
so a run never trains for an hour and then fails at the push. The token comes from a Prefect
Secret block (`output.hub_token_secret`) or the environment (HF_TOKEN) and is handed to the hub
client only: never logged, never in the config, the report or W&B.
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import OutputConfig
from tasks.models import ModelRef, local_model_dir
from tasks.runtime import hub_offline, retry_transient, run_logger, secret


def hub_token(output: OutputConfig) -> str:
    """The hub token: the named Prefect Secret block, else HF_TOKEN; ValueError naming the field if none."""
    if output.hub_token_secret:
        return secret(output.hub_token_secret, "output.hub_token_secret", "the environment variable HF_TOKEN")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError(
            f"output.push_to_hub={output.push_to_hub!r} needs a hub token: set HF_TOKEN, or name a Prefect "
            "Secret block holding it in output.hub_token_secret"
        )
    return token


def check_hub(output: OutputConfig) -> None:
    """A push is possible: the hub is enabled and a token is there (ValueError naming the field)."""
    if not output.push_to_hub:
        return
    if hub_offline():
        raise ValueError(
            f"output.push_to_hub={output.push_to_hub!r}, but the hub is disabled (HF_HUB_OFFLINE=1): "
            "run with HF_HUB_OFFLINE=0 on a machine that reaches huggingface.co, or unset output.push_to_hub"
        )
    hub_token(output)


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[10, 60])
def push_model(model: ModelRef, output: OutputConfig, run_id: str) -> str:
    """Upload the tuned (merged) model folder to the hub repo; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token(output))
    api.create_repo(output.push_to_hub, private=output.hub_private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=output.push_to_hub, folder_path=str(local_model_dir(model)),
        commit_message=f"smolflow run {run_id}",
    )
    run_logger().info("Model pushed to %s", commit.commit_url)
    return commit.commit_url
