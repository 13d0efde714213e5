"""Non-ASCII text under a non-UTF-8 locale: real child processes under a generated latin-1 locale
(LANG=en_US.ISO-8859-1, where Python's UTF-8 mode does not kick in, unlike LANG=C) read a user's
.jinja template and the judge's cached verdicts as the UTF-8 they are, and `smolflow validate`
prints UTF-8 prompts without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCALE = "en_US.ISO-8859-1"


def python(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # Bytes out: the children write in their locale's encoding, which each test decodes itself.
    return subprocess.run([sys.executable, *args], capture_output=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def latin1_env(tmp_path_factory) -> dict:
    """The test session's environment under a latin-1 locale generated for it (no root needed)."""
    if shutil.which("localedef") is None:
        pytest.skip("localedef is missing: no latin-1 locale to run under")
    folder = tmp_path_factory.mktemp("locale")
    made = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(folder / LOCALE)],
                          capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONUTF8", "PYTHONIOENCODING", "PYTHONLEGACYWINDOWSSTDIO") and not k.startswith("LC_")}
    env |= {"LOCPATH": str(folder), "LANG": LOCALE, "LC_ALL": LOCALE, "PYTHONPATH": str(ROOT)}
    probe = python(env, "-c", "import locale, sys; print(locale.getpreferredencoding(False), sys.flags.utf8_mode)")
    if probe.stdout.split() != [b"ISO-8859-1", b"0"]:  # e.g. the en_US locale source is not installed
        pytest.skip(f"the latin-1 locale did not take: {made.stderr.strip()} {probe.stdout!r} {probe.stderr[-300:]!r}")
    return env


def _ok(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode("latin-1")
    assert out.returncode == 0 and "Traceback" not in err, err[-3000:]
    return out.stdout.decode("ascii")  # the children print json.dumps (ASCII escapes)


TEMPLATE = ("{% for m in messages %}« {{ m['role'] }} » — {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}")
RENDER = """
import json, sys
from tasks.config import DataConfig, TemplateConfig
from tasks.data import load_chat_dataset
from tasks.models import load_model, resolve_model
from tasks.templates import prepare_chat_template

model_dir, path = sys.argv[1:]
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
out = prepare_chat_template.fn(resolve_model.fn(model_dir), data, TemplateConfig(chat_template=path))
_, tokenizer = load_model(out.model)
print(json.dumps({"rendered": out.rendered_example, "saved": tokenizer.chat_template}))
"""


def test_a_jinja_template_with_non_ascii_renders_exactly(latin1_env, tiny_model_dir, tmp_path):
    path = tmp_path / "guillemets.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    shown = json.loads(_ok(python(latin1_env, "-c", RENDER, str(tiny_model_dir), str(path))))
    # Read in the locale's encoding it was "Â« user Â» â\x80\x94 Hi": the model trained on that.
    first = "« user » — Hi\n« assistant » — Hello! How can I help you today?<|im_end|>\n"
    assert shown["rendered"].startswith(first)
    assert shown["saved"] == TEMPLATE


JUDGE = """
import json, sys
from tasks.judge import _cached, _store, judgement_key

raw, store = json.loads(sys.argv[1]), sys.argv[2] == "store"  # argv is decoded in the locale: JSON escapes
key = judgement_key("judge-id", "template", raw, "output a", "output b")
if store:
    _store(key, "judge-id", raw)
print(json.dumps({"key": key, "cached": _cached(key)}))
"""


def test_a_cached_judge_verdict_with_non_ascii_reads_back_the_same(latin1_env, tmp_path):
    raw = "Output (b) — « π ≈ 3,14 » est meilleure."
    env = latin1_env | {"SMOLFLOW_CACHE": str(tmp_path / "cache")}
    stored = json.loads(_ok(python(env, "-c", JUDGE, json.dumps(raw), "store", timeout=120)))
    assert stored["cached"] == raw  # was "Output (b) â\x80\x94 Â« Ï\x80 ...": its UTF-8 read as latin-1
    path = tmp_path / "cache" / "judgements" / f"{stored['key']}.json"
    assert json.loads(path.read_bytes().decode("utf-8"))["raw"] == raw
    reread = json.loads(_ok(python(env, "-c", JUDGE, json.dumps(raw), "read", timeout=120)))  # a later run
    assert reread == stored


def test_validate_prints_utf8_prompts_on_a_latin1_stdout(latin1_env, tmp_path):
    prompts = ["用一句话解释 π ≈ 3.14", "Café — crème brûlée?"]
    config = tmp_path / "zh.yaml"
    config.write_text(yaml.safe_dump({"sampling": {"prompts": prompts}, "judge": {"enabled": False}},
                                     allow_unicode=True), encoding="utf-8")
    # No PREFECT_API_URL: validate runs no flow, so it starts no server.
    out = python(latin1_env, "-m", "flows.cli", "validate", "--config", str(config))
    err = out.stderr.decode("latin-1")
    assert out.returncode == 0 and "Traceback" not in err, err[-3000:]  # was: 'latin-1' codec can't encode '\u2248'
    assert err.splitlines()[-1] == "OK: everything checks out"
    shown = yaml.safe_load(out.stdout.decode("latin-1"))  # what the terminal can't show is YAML's escapes
    assert shown["config"]["sampling"]["prompts"] == prompts
