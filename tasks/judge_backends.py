"""Judge backends: who answers a judging prompt. A local transformers model or any
OpenAI-compatible endpoint (OpenAI, vLLM, TGI, Ollama, `transformers serve`), behind one
interface: `make_backend(cfg).chat(conversations, max_new_tokens)`, greedy.

`identity` says what the judge *is*, so cached verdicts are keyed on it: the local model's
content fingerprint (a re-trained judge at the same path re-judges) and, off fp32 on the CPU, how
it computes (device, precision; in bf16 the kernels and threads too: bf16's rounding moves its
verdicts), or the endpoint and model name (all we can know about a remote model).
"""

from __future__ import annotations

import abc
import os
from urllib.parse import urlsplit

from tasks.config_base import JudgeEndpoint
from tasks.models import BUILTIN, ModelRef, load_model, resolve_model
from tasks.runtime import redact_url, secret

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PLACEHOLDER_KEY = "EMPTY"  # what local OpenAI-compatible servers (vLLM, transformers serve) accept


class JudgeBackend(abc.ABC):
    """A judge model: greedy chat completions for a batch of conversations."""

    identity: str  # what the judge is (for cache keys); never holds a secret

    @abc.abstractmethod
    def chat(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        """One greedy answer per conversation (a list of {role, content} messages), in order."""


class LocalBackend(JudgeBackend):
    """A transformers model on this machine, batched through its chat template."""

    def __init__(self, ref: ModelRef, batch_size: int = 8):
        self.ref, self.batch_size = ref, batch_size
        self.identity = local_identity(ref)
        self._loaded = None  # loaded on the first call: a fully cached re-run never loads the model

    def chat(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        from tasks.generation import generate

        if self._loaded is None:
            model, tokenizer = load_model(self.ref)
            if not tokenizer.chat_template:
                raise ValueError(
                    f"judge.model={self.ref.source!r} has no chat template, so it cannot read a judging prompt; "
                    "use an instruction-tuned model (e.g. judge.model: auto, the built-in SmolLM2-135M-Instruct)"
                )
            self._loaded = (model.eval(), tokenizer)
        model, tokenizer = self._loaded
        samples = generate(model, tokenizer, conversations, max_new_tokens, batch_size=self.batch_size)
        return [s.completion for s in samples]


class OpenAIBackend(JudgeBackend):
    """An OpenAI-compatible /v1/chat/completions endpoint, temperature 0, with retries."""

    def __init__(self, base_url: str, model: str, api_key: str, max_retries: int = 3, timeout: float = 120.0):
        from openai import OpenAI

        self.model = model
        self.identity = f"openai:{redact_url(base_url)}:{model}"
        # The SDK retries connection errors, 408/409/429 and 5xx with exponential backoff.
        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)

    def chat(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        import openai

        where = redact_url(str(self.client.base_url))
        answers = []
        for messages in conversations:
            # max_tokens, not max_completion_tokens: vLLM, TGI, Ollama and transformers serve all take it.
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=max_new_tokens
                )
            except openai.APIConnectionError as err:  # after the SDK's retries; still transient for the task's
                raise ConnectionError(f"judge.base_url={where!r}: no answer ({err}); check the URL and that the "
                                      "server is running") from err
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise PermissionError(f"judge: {where} refused the API key (HTTP {err.status_code}); check "
                                      "judge.api_key_env / judge.api_key_secret") from None
            except openai.NotFoundError as err:
                raise ValueError(f"judge.model={self.model!r}: {where} answered HTTP 404 ({err.message}); check the "
                                 "model name and judge.base_url") from None
            answers.append((response.choices[0].message.content or "").strip())
        return answers


def check_endpoint(cfg: JudgeEndpoint, timeout: float = 10.0) -> None:
    """An OpenAI-compatible judge answers at judge.base_url and takes the key (one GET /models):
    said in seconds by the `smolflow` command, not after an hour of training. ValueError naming the
    setting; a server without /models passes. Served runs do not ask: their judge task retries."""
    if not (cfg.enabled and cfg.backend == "openai"):
        return
    import httpx

    where = redact_url(cfg.base_url)
    try:
        response = httpx.get(where + "/models", headers={"Authorization": f"Bearer {api_key(cfg)}"}, timeout=timeout)
    except httpx.HTTPError as err:
        raise ValueError(f"judge.base_url={where!r}: no answer ({type(err).__name__}: {err}); check the URL and "
                         "that the server is running") from None
    if response.status_code in (401, 403):
        source = (f"the Prefect Secret block judge.api_key_secret={cfg.api_key_secret!r}" if cfg.api_key_secret
                  else f"the environment variable judge.api_key_env={cfg.api_key_env!r}")
        raise ValueError(f"judge: {where} refused the API key (HTTP {response.status_code}); check {source}")


def api_key(cfg: JudgeEndpoint) -> str:
    """The endpoint's key: the Prefect Secret block if named, else the environment variable."""
    if cfg.api_key_secret:
        return secret(cfg.api_key_secret, "judge.api_key_secret",
                      f"the environment variable judge.api_key_env={cfg.api_key_env!r}")
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if urlsplit(cfg.base_url or "").hostname in LOCAL_HOSTS:
        return PLACEHOLDER_KEY  # local servers usually check no key
    raise ValueError(
        f"judge: no API key for {cfg.base_url}: set the environment variable judge.api_key_env="
        f"{cfg.api_key_env!r}, or name a Prefect Secret block holding it in judge.api_key_secret"
    )


def local_identity(ref: ModelRef) -> str:
    """A local judge's identity: its model's content, and how this run's placement computes it."""
    from tasks.device import computed_as

    how = computed_as()
    return f"local:{ref.fingerprint}" + (f" ({how})" if how else "")


def judge_identity(cfg: JudgeEndpoint) -> str:
    """The `identity` make_backend(cfg) would have, without a key or a loaded model (cache keys)."""
    if cfg.backend == "openai":
        return f"openai:{redact_url(cfg.base_url)}:{cfg.model}"
    return local_identity(resolve_model.fn(BUILTIN if cfg.model == 'auto' else cfg.model))


def make_backend(cfg: JudgeEndpoint) -> JudgeBackend:
    """The judge the config names ('auto' local: the built-in SmolLM2-135M-Instruct)."""
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.base_url, cfg.model, api_key(cfg))
    # 'auto' is always the built-in instruct model here, online too: a judge must follow
    # instructions, and the hub default (SmolLM2-135M) is a base model.
    return LocalBackend(resolve_model.fn(BUILTIN if cfg.model == "auto" else cfg.model))
