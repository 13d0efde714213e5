"""The sandbox hides the host's folders that hold other runs' data, credentials and smolflow itself
(wherever they live and whatever their names), runs the interpreter it picks, and speaks UTF-8."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tasks import sandbox
from tasks.benchmarks.humaneval import bundled_file
from tasks.sandbox import Limits, run_python

FAST = Limits(timeout_s=5, cpu_s=5)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the uid switch need root")


def _private_tree(files: dict[str, str], parent: str = "/var/lib") -> Path:
    """A 0755 folder under /var/lib (outside every fixed hidden place and the sandbox's /tmp) holding
    world-readable files at these relative paths (the program could read them if not hidden)."""
    base = Path(tempfile.mkdtemp(prefix="smolflow-test-", dir=parent))
    os.chmod(base, 0o755)
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, 0o644)
        for d in path.parents:
            if d == base.parent:
                break
            os.chmod(d, 0o755)
    return base


def _read_each(paths: list[Path]) -> str:
    """A program printing `reached` or `refused` for each file."""
    return (f"import os, sys\nfor path in {[str(p) for p in paths]!r}:\n"
            "    try:\n"
            "        print('reached', path, open(path).read().strip())\n"
            "    except OSError as e:\n"
            "        print('refused', path, e.errno)\n")


@needs_root
def test_host_folders_are_hidden_and_the_interpreter_still_works(monkeypatch):
    # A run root outside every fixed hidden place and outside /tmp (which the sandbox covers anyway):
    # ./smolflow-runs below the current folder, as `output.root` defaults to.
    base = _private_tree({"smolflow-runs/runs/other-run/records.jsonl": "other run's data\n"})
    try:
        record = base / "smolflow-runs" / "runs" / "other-run" / "records.jsonl"
        monkeypatch.chdir(base)
        checkout = Path(__file__).resolve().parents[1]
        targets = [f"listdir {checkout}", f"read {checkout / '.git' / 'config'}", f"read {record}", f"read {bundled_file()}"]
        program = (
            "import os, sys\n"
            f"for target in {targets!r}:\n"
            "    action, path = target.split(' ', 1)\n"
            "    try:\n"
            # A checkout outside /work is an empty tmpfs, or holds only its .venv when that is the interpreter's.
            "        seen = [e for e in os.listdir(path) if e != '.venv'] if action == 'listdir' else open(path, 'rb').read(20)\n"
            "        print('reached' if seen else 'refused (empty)', path, seen)\n"
            "    except OSError as e:\n"
            "        print('refused', path, e.errno)\n"
            "import json, decimal, sqlite3\n"  # the stdlib, C extensions included
            "print('python', sys.version.split()[0])\n"
        )
        result = run_python(program, FAST)
    finally:
        shutil.rmtree(base)
    assert result.passed, result.stderr
    assert "reached" not in result.stdout and result.stdout.count("refused") == 4, result.stdout
    assert "hidden host dirs" in result.isolation


def test_the_checkout_is_hidden_wherever_it_lives_and_whatever_the_current_folder(tmp_path, monkeypatch):
    # CI clones to /check/work/main: outside every fixed hidden folder, and tests run from anywhere.
    monkeypatch.chdir(tmp_path)
    assert str(Path(sandbox.__file__).resolve().parents[1]) in sandbox.hidden_paths()


@needs_root
def test_a_venv_inside_a_hidden_folder_still_runs_the_program(tmp_path, monkeypatch):
    # `make setup` makes <checkout>/.venv; on a host whose venv is built on the system Python, that
    # venv is the sandbox's interpreter, and `python -S` reports the base prefix, not the venv's.
    project = Path(tempfile.mkdtemp(prefix="smolflow-test-", dir="/var/lib"))
    try:
        os.chmod(project, 0o755)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(project / ".venv")], check=True, timeout=120)
        (project / "secret.txt").write_text("not for the program\n")
        monkeypatch.setenv("SMOLFLOW_SANDBOX_PYTHON", str(project / ".venv" / "bin" / "python"))
        monkeypatch.setenv("SMOLFLOW_SANDBOX_HIDE", str(project))
        result = run_python(f"import os, sys\nprint(sys.prefix)\nprint(sorted(os.listdir({str(project)!r})))\n", FAST)
    finally:
        shutil.rmtree(project)
    assert result.passed, result.stderr
    assert result.stdout.splitlines()[:2] == [str(project / ".venv"), "['.venv']"], result.stdout


@needs_root
def test_the_runs_artifacts_root_is_hidden_wherever_it_is(monkeypatch):
    """A run root outside the hidden places (here under /var/lib, which stays visible) holds other
    runs' data and models: a flow hides its own root (hide_from_sandbox) from the programs it runs."""
    from tasks.sandbox import hide_from_sandbox

    root = _private_tree({"runs/secret.json": '{"answer": 42}'})
    try:
        program = f"print(open({str(root / 'runs' / 'secret.json')!r}).read())\n"
        assert '"answer": 42' in run_python(program, FAST).stdout  # visible until the flow hides it
        monkeypatch.delenv("SMOLFLOW_SANDBOX_HIDE", raising=False)
        hide_from_sandbox(str(root))
        hidden = run_python(program, FAST)
        assert not hidden.passed and '"answer": 42' not in hidden.stdout and "No such file" in hidden.stderr
        hide_from_sandbox("s3://bucket/runs")  # nothing local to hide
        assert os.environ["SMOLFLOW_SANDBOX_HIDE"] == str(root)
    finally:
        shutil.rmtree(root)


# Where each library (or the user) keeps credentials and caches: {variable: a file below its folder}.
LIBRARY_PLACES = {"HOME": "home/.netrc", "XDG_CACHE_HOME": "xdg-cache/huggingface/token",
                  "HF_HUB_CACHE": "hub/models--x/secret", "HF_DATASETS_CACHE": "datasets/secret",
                  "PREFECT_HOME": "prefect/profiles.toml", "WANDB_DIR": "wandb/settings",
                  "XDG_CONFIG_HOME": "xdg-config/secret", "XDG_DATA_HOME": "xdg-data/secret"}


def _point_libraries_at(base: Path, monkeypatch) -> list[Path]:
    monkeypatch.delenv("HF_HOME", raising=False)  # then huggingface_hub uses $XDG_CACHE_HOME/huggingface
    for var, rel in LIBRARY_PLACES.items():
        monkeypatch.setenv(var, str(base / rel.split("/")[0]))
    return [base / rel for rel in LIBRARY_PLACES.values()]


def test_home_and_the_libraries_credential_folders_are_hidden(monkeypatch):
    base = _private_tree({rel: "x\n" for rel in LIBRARY_PLACES.values()}, tempfile.gettempdir())  # not root
    try:
        _point_libraries_at(base, monkeypatch)
        hidden = sandbox.hidden_paths()
        assert {str(base / rel.split("/")[0]) for rel in LIBRARY_PLACES.values()} <= set(hidden), hidden
        monkeypatch.setenv("HOME", "/"), monkeypatch.setenv("XDG_CONFIG_HOME", "/etc")  # never hide the system
        assert "/" not in sandbox.hidden_paths() and "/etc" not in sandbox.hidden_paths()
    finally:
        shutil.rmtree(base)


def test_credential_files_and_prefect_stores_named_by_the_environment_are_hidden(monkeypatch):
    """NETRC, AWS_SHARED_CREDENTIALS_FILE ... name files anywhere; Prefect's results and a SQLite
    database may live outside PREFECT_HOME. Their folders stayed visible to the program."""
    base = _private_tree({f"{name}/secret": "x\n" for name in ("netrc", "aws", "aws-config", "gcp", "wandb-token",
                                                               "results", "db")}, tempfile.gettempdir())
    try:
        for var, rel in (("NETRC", "netrc/secret"), ("AWS_SHARED_CREDENTIALS_FILE", "aws/secret"),
                         ("AWS_CONFIG_FILE", "aws-config/secret"), ("GOOGLE_APPLICATION_CREDENTIALS", "gcp/secret"),
                         ("WANDB_IDENTITY_TOKEN_FILE", "wandb-token/secret")):
            monkeypatch.setenv(var, str(base / rel))
        monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(base / "results"))
        monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{base}/db/prefect.db")
        hidden = set(sandbox.hidden_paths())
        assert {str(base / name) for name in ("netrc", "aws", "aws-config", "gcp", "wandb-token", "results", "db")} <= hidden
    finally:
        shutil.rmtree(base)


@needs_root
def test_home_and_the_libraries_credential_folders_are_hidden_in_a_run_and_a_venv_in_home_works(monkeypatch):
    # HOME=/var/local with ~/.prefect/profiles.toml (PREFECT_API_KEY) was readable by the program.
    base = _private_tree({rel: "PREFECT_API_KEY=pnu_secret\n" for rel in LIBRARY_PLACES.values()})
    try:
        private = _point_libraries_at(base, monkeypatch)
        venv = base / "home" / ".venv"  # built on the system Python: the interpreter, bound back
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        monkeypatch.setenv("SMOLFLOW_SANDBOX_PYTHON", str(venv / "bin" / "python"))
        program = _read_each(private) + f"print('prefix', sys.prefix)\nprint(os.listdir({str(base / 'home')!r}))\n"
        result = run_python(program, FAST)
    finally:
        shutil.rmtree(base)
    assert result.passed, result.stderr
    assert "reached" not in result.stdout and result.stdout.count("refused") == len(private), result.stdout
    assert f"prefix {venv}\n['.venv']\n" in result.stdout, result.stdout


@needs_root
def test_a_hidden_folder_whose_name_holds_a_colon_or_a_newline_is_hidden(monkeypatch):
    # hide/keep reached PID 1 joined with ':', so "runs:a" became "runs" and "a": neither hidden.
    base = _private_tree({"runs:a\nb/records.jsonl": "other run's data\n"})
    try:
        monkeypatch.chdir(base / "runs:a\nb")  # the current folder is hidden
        assert str(base / "runs:a\nb") in sandbox.hidden_paths()
        result = run_python(_read_each([base / "runs:a\nb" / "records.jsonl"]), FAST)
    finally:
        shutil.rmtree(base)
    assert result.passed, result.stderr
    assert "reached" not in result.stdout and "refused" in result.stdout, result.stdout


@needs_root
def test_weak_mode_skips_a_python_behind_a_closed_folder(monkeypatch):
    # A venv in a 0700 folder links to /usr/bin/python3 (world-executable), but the dropped uid
    # cannot pass the folder: Popen failed with PermissionError and the benchmark aborted.
    base = Path(tempfile.mkdtemp(prefix="smolflow-test-", dir="/var/lib"))  # 0700
    try:
        (base / "bin").mkdir(mode=0o755)
        (base / "bin" / "python").symlink_to("/usr/bin/python3")
        monkeypatch.setenv("SMOLFLOW_SANDBOX_PYTHON", str(base / "bin" / "python"))
        monkeypatch.setenv("SMOLFLOW_UNSHARE", "/nonexistent/unshare")
        monkeypatch.setenv("SMOLFLOW_SANDBOX", "weak")
        assert sandbox.interpreter(True) != str(base / "bin" / "python")
        result = run_python("import sys\nprint(sys.executable)\n", FAST)
    finally:
        shutil.rmtree(base)
    assert result.passed and str(base) not in result.stdout, (result.stdout, result.stderr)


@pytest.mark.parametrize("mode", ["namespaces", "weak"])
def test_programs_and_output_are_utf8_under_a_latin1_locale(mode, tmp_path):
    # HumanEval/72's prompt holds '\u279e': writing it in a latin-1 locale raised UnicodeEncodeError.
    if not shutil.which("localedef"):
        pytest.skip("no localedef to build a latin-1 locale")
    if mode == "namespaces" and os.geteuid() != 0:
        pytest.skip("namespaces and the uid switch need root")
    subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(tmp_path / "en_US.ISO-8859-1")],
                   capture_output=True, timeout=120)
    if not (tmp_path / "en_US.ISO-8859-1").is_dir():
        pytest.skip("localedef could not build en_US.ISO-8859-1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env |= {"LANG": "en_US.ISO-8859-1", "LC_ALL": "en_US.ISO-8859-1", "LOCPATH": str(tmp_path),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if mode == "weak":
        env |= {"SMOLFLOW_UNSHARE": "/nonexistent/unshare", "SMOLFLOW_SANDBOX": "weak"}
    script = (
        "import json, locale\n"
        "from tasks.benchmarks.humaneval import bundled_file, check, read_problems\n"
        "from tasks.sandbox import Limits, run_python\n"
        "print(json.dumps({'encoding': locale.getpreferredencoding(False)}))\n"
        "p = [p for p in read_problems(bundled_file()) if p['task_id'] == 'HumanEval/72']\n"
        "r = check(p, [p[0]['canonical_solution']], Limits(timeout_s=20), workers=1)[0]\n"
        "print(json.dumps({'canonical': r.passed, 'stderr': r.stderr[-300:]}))\n"
        "r = run_python('import sys\\nprint(\"\\u279e\", file=sys.stderr)\\nprint(\"caf\\u00e9 \\u279e\")\\n')\n"
        "print(json.dumps({'passed': r.passed, 'stdout': r.stdout, 'stderr': r.stderr}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode("latin-1")[-2000:]
    lines = [json.loads(line) for line in out.stdout.decode("ascii").splitlines()]
    assert lines[0]["encoding"].lower().replace("-", "").replace("_", "") == "iso88591"  # the locale applied
    assert lines[1]["canonical"], lines[1]
    assert lines[2]["passed"] and lines[2]["stdout"].startswith("caf\u00e9 \u279e\n"), lines[2]
    assert lines[2]["stderr"] == "\u279e\n", lines[2]
