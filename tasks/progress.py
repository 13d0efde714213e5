"""Progress of the long stages (training steps, benchmark scoring): a progress artifact in the flow
run's Artifacts tab, and a log line with percent and ETA at the start, at each tenth and at the end
(so a 1000-step run prints about a dozen lines, not one per step)."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import MissingContextError, get_run_context

from tasks.console import verbose
from tasks.runtime import run_logger


class Progress:
    """A stage's progress: log lines, plus an artifact inside a Prefect run (none for a task's .fn called directly)."""

    def __init__(self, key: str, description: str, total: int):
        self.key, self.description, self.total, self.id = key, description, max(total, 1), None
        self.started, self.tenth, self.start_done, self.shown = time.monotonic(), -1, None, -1
        self.said: str | None = None  # the description last sent with the artifact
        try:
            get_run_context()
        except MissingContextError:
            return
        self.id = self._call(create_progress_artifact, 0.0, key=key, description=description)

    def update(self, done: float, description: str | None = None) -> None:
        percent = min(100.0, 100.0 * done / self.total)
        # One API call a percent, not one a step; at 100% each new description too (the last eval, "done").
        if self.id is not None and (int(percent) != self.shown or (percent >= 100 and description != self.said)):
            self.shown, self.said = int(percent), description
            self._call(update_progress_artifact, self.id, percent, description=description)
        tenth = int(percent // 10)
        if tenth != self.tenth:  # a line when a new tenth is reached (0%, 10%, ... 100%)
            self.tenth = tenth
            run_logger().info("%s", self.line(done, description))

    def line(self, done: float, detail: str | None = None) -> str:
        """'Training steps: 40% (step 12 of 30), ETA 1m05s'; the ETA from the pace since the first update."""
        if self.start_done is None:  # a resumed run starts past 0: its pace counts from here
            self.start_done, self.started = done, time.monotonic()
        percent = min(100.0, 100.0 * done / self.total)
        elapsed = time.monotonic() - self.started
        if percent >= 100:
            eta = f"done in {_duration(elapsed)}"
        elif done > self.start_done:
            eta = f"ETA {_duration(elapsed / (done - self.start_done) * (self.total - done))}"
        else:
            eta = "ETA unknown"
        return f"{self.description}: {percent:.0f}%" + (f" ({detail})" if detail else "") + f", {eta}"

    def _call(self, fn, *args, **kwargs):
        # A progress bar is a view: an API hiccup must not fail hours of training.
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            run_logger().warning("Progress artifact %s not updated: %s: %s", self.key, type(err).__name__, err)
            return self.id


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def training_progress():
    """A TrainerCallback that moves a progress artifact with the optimizer steps (a line at each
    tenth of them), with the latest logged losses."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        bar: Progress | None = None
        losses: dict[str, float] = {}
        eval_step: int | None = None

        def detail(self, state) -> str:
            loss, eval_loss = self.losses.get("loss"), self.losses.get("eval_loss")
            # The Trainer logs a step's train loss before it evaluates: an eval loss is an earlier step's then.
            at = f" (step {self.eval_step})" if self.eval_step != state.global_step else ""
            return (f"step {state.global_step} of {state.max_steps}"
                    + (f", train loss {loss:.4f}" if loss is not None else "")
                    + (f", eval loss {eval_loss:.4f}{at}" if eval_loss is not None else ""))

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar, self.losses = Progress("smolflow-training-progress", "Training steps", state.max_steps), {}
            self.bar.update(state.global_step, self.detail(state))

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None and not control.should_log:  # a logging step: on_log moves it, with its loss
                self.bar.update(state.global_step, self.detail(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if verbose():  # the Trainer's whole log entry, numbers as numbers
                run_logger().info("Trainer log: %s", {k: v for k, v in logs.items() if k != "total_flos"})
            self.losses |= {k: logs[k] for k in ("loss", "eval_loss") if logs.get(k) is not None}
            if logs.get("eval_loss") is not None:
                self.eval_step = state.global_step
            if self.bar is not None:
                self.bar.update(state.global_step, self.detail(state))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.bar.total, f"done: {state.global_step} steps")

    return TrainingProgress()
