"""smolflow on a machine set up differently from ours: the cache where the settings say (a literal
`~` as systemd or docker pass it, XDG_CACHE_HOME), and the code version of smolflow itself, not of
a repository it was copied into."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict, cwd: Path, path: Path = ROOT) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SMOLFLOW_CACHE", "XDG_CACHE_HOME")} | env
    out = subprocess.run([sys.executable, "-c", code], env=env | {"PYTHONPATH": str(path)}, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_cache_is_where_the_settings_say(tmp_path):
    code = "from tasks.runtime import cache_dir; from tasks.cache_limit import cache_root; print(cache_dir('x'), cache_root())"
    home = tmp_path / "home"
    # A literal ~ once made a folder named "~" in the current folder, and the datasets cache went elsewhere.
    made, root = _python(code, {"HOME": str(home), "SMOLFLOW_CACHE": "~/smolcache"}, tmp_path).split()
    assert (made, root) == (str(home / "smolcache" / "x"), str(home / "smolcache"))
    assert not (tmp_path / "~").exists()
    xdg = tmp_path / "xdg"
    assert _python(code, {"HOME": str(home), "XDG_CACHE_HOME": str(xdg)}, tmp_path).split()[1] == str(xdg / "smolflow")
    assert _python(code, {"HOME": str(home)}, tmp_path).split()[1] == str(home / ".cache" / "smolflow")


def test_a_copy_inside_another_repository_does_not_report_its_commit(tmp_path):
    project = tmp_path / "their-project"
    site = project / "site-packages"
    shutil.copytree(ROOT / "tasks", site / "tasks", ignore=shutil.ignore_patterns("fixtures", "__pycache__"))
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "theirs"], check=True)
    assert _python("from tasks.runtime import git_commit; print(git_commit())", {}, tmp_path, site) == "None"
    if not (ROOT / ".git").exists():
        return  # an unpacked release: no commit to report
    # smolflow's own checkout still reports its commit.
    ours = _python("from tasks.runtime import git_commit; print(git_commit())", {}, tmp_path)
    assert ours != "None" and len(ours.removesuffix("+dirty")) == 12


def test_a_cache_that_cannot_be_made_is_one_line(tmp_path):
    # HOME=/ (a service account) or an unwritable SMOLFLOW_CACHE ended `smolflow run` in a traceback.
    # A file where a folder must be refuses root too.
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "SMOLFLOW_CACHE"} | {
        "SMOLFLOW_CACHE": str(tmp_path / "a-file" / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    smolflow = str(Path(sys.executable).parent / "smolflow")
    for command in (["run", "--output.artifacts-uri", str(tmp_path / "runs")], ["validate"]):
        out = subprocess.run([smolflow, *command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"smolflow's cache {tmp_path / 'a-file' / 'cache'} cannot be used (Not a directory" in out.stderr
        assert "Set SMOLFLOW_CACHE (or XDG_CACHE_HOME) to a folder this user can write" in out.stderr
    assert out.stderr.splitlines()[0].startswith("smolflow validate: cache: smolflow's cache")
    assert not (tmp_path / "runs").exists()


def test_a_failed_atomic_write_leaves_no_staging_file(tmp_path):
    """A full disk (ENOSPC) mid-write left `status.json.tmp<pid>` files in run folders for good; any
    failure between the staging write and the rename leaves nothing now (here: the target is a folder)."""
    from tasks.runtime import atomic_write

    (tmp_path / "status.json").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "status.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
