"""scripts/gpu_kit.py and scripts/gpu_device.sh: the packages gpu_run.py needs reach a device machine
with no registry, in parts under the 64 MiB a call carries, and run there only once all have come."""

import base64
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_kit)


def test_parts_stay_within_room_and_pieces_join_back(tmp_path):
    rng = random.Random(0)
    files = []
    for k, size in enumerate([10, 300, 450, 999, 1000, 2500, 7]):
        files.append(tmp_path / "in" / f"f{k}.whl")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(rng.randbytes(size))
    parts = gpu_kit.pack(files, tmp_path / "kit", room=1000)

    names = set()
    for part in parts:
        held = [f for f in part.iterdir() if f.name != "kit.txt"]
        assert sum(f.stat().st_size for f in held) <= 1000
        names |= {f.name for f in held}
    assert len(parts) == 6  # 5,266 bytes in parts of 1,000
    for part in parts:  # each part names every file of the kit
        assert set((part / "kit.txt").read_text().split()) == names
    for file in files:
        whole = [p / file.name for p in parts if (p / file.name).exists()]
        pieces = sorted((f for p in parts for f in p.glob(f"{file.name}.piece-*")), key=lambda f: f.name)
        assert bool(whole) != bool(pieces)  # whole, or in pieces, never both
        assert b"".join(f.read_bytes() for f in whole + pieces) == file.read_bytes()
    assert (parts[0] / "f6.whl").exists() and (parts[0] / "f0.whl").exists()  # the small ones go whole
    assert not (parts[0] / "f5.whl").exists()  # 2,500 bytes: more than any part holds, cut


def make_wheel(folder: Path, name: str, payload_bytes: int) -> tuple[Path, str]:
    """A real (installable) pure-Python wheel whose module holds `payload_bytes` random hex digits."""
    payload = random.Random(name).randbytes(payload_bytes // 2).hex()
    files = {f"{name}/__init__.py": f"PAYLOAD = {payload!r}\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-1.0.dist-info/RECORD"] = "\n".join(record + [f"{name}-1.0.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel, payload


def test_the_device_script_waits_for_every_part_then_installs_and_runs(tmp_path):
    big, payload = make_wheel(tmp_path / "wheels", "bigkit", 40_000)
    small, _ = make_wheel(tmp_path / "wheels", "smallkit", 2_000)
    parts = gpu_kit.pack([big, small], tmp_path / "kit", room=25_000)
    assert len(parts) == 2 and any(parts[1].glob("bigkit-*.piece-01"))  # the big wheel spans both

    repo = tmp_path / "repo"  # what a call sends: the working tree, plus the one part it carries
    (repo / "scripts").mkdir(parents=True)
    for script in ("gpu_device.sh", "gpu_run.py", "bench_eval.py"):
        shutil.copy(ROOT / "scripts" / script, repo / "scripts")
    site, out = tmp_path / "site", tmp_path / "out"
    env = os.environ | {"PYTHON": sys.executable, "SMOLFLOW_KIT_STASH": str(tmp_path / "stash"),
                        "SMOLFLOW_KIT_SITE": str(site), "SMOLFLOW_KIT_WORK": str(tmp_path / "work"), "OUT": str(out)}

    def call(part: Path | None, *args: str) -> subprocess.CompletedProcess:
        shutil.rmtree(repo / ".kit", ignore_errors=True)  # a call carries its own part only
        if part:
            shutil.copytree(part, repo / ".kit" / part.name)
        return subprocess.run(["bash", str(repo / "scripts" / "gpu_device.sh"), *args], cwd=tmp_path, env=env,
                              text=True, capture_output=True, timeout=300, check=False)

    done = call(None)
    assert done.returncode == 2 and "no kit part carried" in done.stderr

    done = call(parts[0])
    assert done.returncode == 0, done.stderr
    assert "still to come: carry the next part now" in done.stdout
    assert not site.exists() and not out.exists()  # nothing installed or run with a part missing

    done = call(parts[1], "--help")  # the last part: join, install, run gpu_run.py with these arguments
    assert done.returncode == 0, done.stdout + done.stderr
    installed = site / "bigkit" / "__init__.py"
    assert installed.read_text() == f"PAYLOAD = {payload!r}\n"  # joined from its pieces, byte for byte
    assert (site / "smallkit" / "__init__.py").exists()
    log = (out / "gpu_run.log").read_text()
    assert "| transformers" in log and "| lm_eval" in log  # the versions it ran with
    assert "--steps STEPS" in log  # gpu_run.py's own help: it ran, with the arguments passed on

    # Another script next, no part carried: the kit is installed already, so it runs at once.
    installed.write_text("# kept\n")
    env["GPU_SCRIPT"] = "scripts/bench_eval.py"
    done = call(None, "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed.read_text() == "# kept\n"  # not installed again
    assert "--device {cpu,cuda}" in (out / "bench_eval.log").read_text()
