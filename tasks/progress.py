"""Prefect progress artifacts: a progress bar in the flow run's Artifacts tab for the long stages
(training steps, benchmark scoring)."""

from __future__ import annotations

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import MissingContextError, get_run_context

from tasks.runtime import run_logger


class Progress:
    """One progress artifact; a no-op outside a Prefect run (e.g. a task's .fn called directly)."""

    def __init__(self, key: str, description: str, total: int):
        self.key, self.total, self.id = key, max(total, 1), None
        try:
            get_run_context()
        except MissingContextError:
            return
        self.id = self._call(create_progress_artifact, 0.0, key=key, description=description)

    def update(self, done: float, description: str | None = None) -> None:
        if self.id is not None:
            percent = min(100.0, 100.0 * done / self.total)
            self._call(update_progress_artifact, self.id, percent, description=description)

    def _call(self, fn, *args, **kwargs):
        # A progress bar is a view: an API hiccup must not fail hours of training.
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            run_logger().warning("Progress artifact %s not updated: %s: %s", self.key, type(err).__name__, err)
            return self.id


def training_progress():
    """A TrainerCallback that moves a progress artifact with the optimizer steps, at each log."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = Progress("smolflow-training-progress", "Training steps", state.max_steps)
            self.bar.update(state.global_step, f"step {state.global_step} of {state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None:
                loss = (logs or {}).get("loss")
                self.bar.update(state.global_step, f"step {state.global_step} of {state.max_steps}"
                                + (f", train loss {loss:.4f}" if loss is not None else ""))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.bar.total, f"done: {state.global_step} steps")

    return TrainingProgress()
