"""Where models run and in which precision: decided per machine, never assumed.

`execution.device: auto` means CUDA when present, else the CPU. `execution.precision: auto` means
bf16 on a CUDA device that supports it, and on a CPU only where a short probe (a bf16 vs an fp32
matmul, ~0.2 s, cached per machine) shows bf16 faster: CPUs with bf16 units ran it ~9x faster per
thread here, CPUs without them far slower, so the answer differs between machines.

The flow publishes its ExecutionConfig in the environment (`SMOLFLOW_EXECUTION`), so every process
that loads a model (Prefect tasks, Ray workers given the same env, torchrun workers) resolves it on
its own machine. Without it (scripts, unit tests) models load as they always did: fp32 on the CPU.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from tasks.config import DeviceConfig, ExecutionConfig

ENV = "SMOLFLOW_EXECUTION"
_LEGACY = ExecutionConfig(device="cpu", precision="fp32")


class Probe(BaseModel):
    """Timings of one bf16 vs fp32 matmul on this CPU."""

    fp32_s: float
    bf16_s: float
    threads: int

    @property
    def bf16_faster(self) -> bool:
        # A 10% margin: bf16 also costs accuracy, so a tie is not worth it.
        return self.bf16_s < 0.9 * self.fp32_s


class Placement(BaseModel):
    """The decision: where models go and in which dtype, and why."""

    device: Literal["cpu", "cuda"]
    precision: Literal["fp32", "bf16"]
    requested: ExecutionConfig
    reason: str
    probe: Probe | None = None

    @property
    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def decide(cfg: ExecutionConfig, cuda: bool, cuda_bf16: bool, probe: Probe | None) -> Placement:
    """The pure decision, from what the machine offers (`probe` is needed only for CPU + auto)."""
    if cfg.device == "cuda" and not cuda:
        raise ValueError("execution.device: 'cuda', but no CUDA device is visible here: use 'auto' or 'cpu'")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if cfg.precision != "auto":
        return Placement(device=device, precision=cfg.precision, requested=cfg, reason="set in execution.precision",
                         probe=probe)
    if device == "cuda":
        precision = "bf16" if cuda_bf16 else "fp32"
        reason = "CUDA device " + ("supports bf16" if cuda_bf16 else "without bf16 support")
        return Placement(device=device, precision=precision, requested=cfg, reason=reason)
    if probe is None:
        raise ValueError("precision 'auto' on the CPU needs the matmul probe's timings")
    precision = "bf16" if probe.bf16_faster else "fp32"
    # Two significant digits: with AMX a bf16 probe matmul takes ~0.03 ms, which ".1f" printed as 0.0.
    reason = (f"CPU probe: bf16 matmul {probe.bf16_s * 1e3:.2g} ms vs fp32 {probe.fp32_s * 1e3:.2g} ms "
              f"({probe.threads} thread{'' if probe.threads == 1 else 's'})")
    return Placement(device=device, precision=precision, requested=cfg, reason=reason, probe=probe)


def race(candidates: dict[str, Callable[[], object]], rounds: int = 3, budget_s: float = 0.0,
         warmup: bool = True) -> dict[str, float]:
    """Best-of CPU seconds of each candidate on one thread, the candidates alternating, at least
    `rounds` times and for about `budget_s` seconds, after an untimed first call of each unless
    `warmup` is false (the probes' one way of timing).

    One thread, because on a busy machine a multi-threaded op waits for each of its threads' turn:
    beside CI's tests the first bf16 matmuls on 2 threads took 8-11 ms instead of 0.09 for a whole
    0.1 s window, and that process picked fp32 on a CPU with bf16 units while another picked bf16.
    On one thread the work (a CPU autograd backward included) runs in the calling thread, whose CPU
    time leaves out the time it waited for a core. Alternating, because two windows one after the
    other see different loads. Per thread is what bf16 units and cache-sized tiles change."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in candidates.values() if warmup else ():
            run()  # first call: kernel selection, not speed
        best = dict.fromkeys(candidates, float("inf"))
        done, deadline = 0, time.perf_counter() + budget_s
        while done < rounds or time.perf_counter() < deadline:
            for name, run in candidates.items():
                start = time.thread_time()  # this thread's CPU time: the time it waited for a core is not the run's
                run()
                best[name] = min(best[name], time.thread_time() - start)
            done += 1
    finally:
        torch.set_num_threads(threads)
    return best


def probe_cpu(n: int = 256, budget_s: float = 0.2, rounds: int = 5) -> Probe:
    """Best-of time of an n x n matmul in fp32 and in bf16 (`race`: one thread, alternating, ~0.2 s)."""
    import torch

    pairs = {dtype: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = race({str(dtype): (lambda a=a, b=b: a @ b) for dtype, (a, b) in pairs.items()}, rounds, budget_s)
    return Probe(fp32_s=best[str(torch.float32)], bf16_s=best[str(torch.bfloat16)], threads=1)


# CPU units that pick different matmul and attention kernels (x86, then Arm).
_UNITS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "asimd", "bf16", "sve")


@functools.lru_cache(maxsize=None)
def _cpu() -> str:
    """The CPU's model name and which of _UNITS it has, from /proc/cpuinfo (else platform's name)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:  # the first processor's block is enough
                if not line.strip():
                    break
                field, _, value = line.partition(":")
                fields.setdefault(field.strip(), value.strip())
    except OSError:
        pass
    part = f"{platform.machine()} CPU part {fields['CPU part']}" if "CPU part" in fields else None  # Arm: no model name
    name = fields.get("model name") or part or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return f"{name} ({' '.join(u for u in _UNITS if u in flags) or 'none of ' + '/'.join(_UNITS)})"


def kernels(device) -> str:
    """What picks the compute kernels on `device`: a GPU's name, or the CPU's model and units. In bf16
    the kernels' rounding shows in per-item results, so it is part of a bf16 score's key."""
    if str(device).split(":")[0] == "cpu":  # without importing torch: a cached re-run may never load a model
        return _cpu()
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu() if device.type == "cpu" else device.type


def _machine_key() -> str:
    import hashlib
    from importlib.metadata import version

    from tasks.runtime import torch_threads

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    what = f"{platform.node()}|{platform.processor()}|{flags}|{version('torch')}|{torch_threads()}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def others_running() -> int:
    """Threads running or waiting for a core now, this one left out (/proc/loadavg); 0 where unknown."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return max(int(f.read().split()[3].split("/")[0]) - 1, 0)
    except (OSError, ValueError, IndexError):
        return 0


def cached_on_machine(name: str, kind: type[BaseModel], measure: Callable[[], BaseModel], quiet_only: bool = False):
    """A probe's result from disk, once per machine (CPU flags, torch, threads), else measured and kept.

    `quiet_only`: kept only if, before and after measuring, fewer threads than cores were running
    besides this one; else used for this run and measured again next time. For probes of
    memory-bound work, which no way of timing shields from other work sharing the caches (beside
    CI's tests one LM-head probe measured smolflow's head 1.45x slow and picked another)."""
    from tasks.runtime import atomic_write, cache_dir, run_logger

    path = cache_dir("probe") / f"{name}-{_machine_key()}.json"
    try:
        return kind.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = others_running()
        result = measure()
        busy = max(before, others_running())
        if quiet_only and busy >= (os.cpu_count() or 1):
            run_logger().info("The %s probe ran beside %d other running threads on %d cores: used for this run, "
                              "not kept", name, busy, os.cpu_count() or 1)
            return result
        atomic_write(path, result.model_dump_json())  # a concurrent reader sees the old file or the whole new one
        return result


@functools.lru_cache(maxsize=None)
def cached_probe() -> Probe:
    """The probe once per process, and once per machine on disk."""
    # "cpu-1t": the one-thread probe's; a multi-threaded probe's "cpu" file may hold a decision a busy
    # machine got wrong, kept for good (on a CPU without bf16 units: bf16, ~10x slower), so it is not read.
    return cached_on_machine("cpu-1t", Probe, probe_cpu)


def _cpu_only_torch() -> bool:
    """Whether the installed torch is a CPU-only build (PyTorch's CPU wheels: '2.13.0+cpu'), which
    can see no GPU: then the decision needs no torch import (~1.5 s of a cached re-run)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch").endswith("+cpu")
    except PackageNotFoundError:
        return False


@functools.lru_cache(maxsize=None)
def _resolve(cfg_json: str) -> Placement:
    cfg = ExecutionConfig.model_validate_json(cfg_json)
    if "torch" not in sys.modules and _cpu_only_torch():
        cuda = cuda_bf16 = False
    else:
        import torch

        cuda = torch.cuda.is_available()
        cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    needs_probe = cfg.precision == "auto" and not (cfg.device == "cuda" or (cfg.device == "auto" and cuda))
    return decide(cfg, cuda, cuda_bf16, cached_probe() if needs_probe else None)


def resolve(cfg: DeviceConfig | None = None) -> Placement:
    """The placement for `cfg` (default: the one the flow published, else fp32 on the CPU)."""
    return _resolve((cfg or active()).model_dump_json())


def active() -> ExecutionConfig:
    """The ExecutionConfig the running flow published, else fp32 on the CPU."""
    raw = os.environ.get(ENV)
    return ExecutionConfig.model_validate_json(raw) if raw else _LEGACY


_previous: list[tuple[str | None, str | None]] = []  # (flow run that published, the value before)


def publish(cfg: DeviceConfig) -> Placement:
    """Make `cfg` the process's (and its children's) execution settings; return the decision. The
    arena's DeviceConfig publishes the local task runner with them."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
    # A retried flow run (its retries, or Retry in the UI) publishes again with no hook run between:
    # the value before its first attempt is the one to restore, not the first attempt's.
    if not (run is not None and _previous and _previous[-1][0] == run):
        _previous.append((run, os.environ.get(ENV)))
    os.environ[ENV] = cfg.model_dump_json()
    return resolve(cfg)


def unpublish(*_hook_args, **_hook_kwargs) -> None:
    """Undo the latest `publish` (a Prefect flow hook): later work in the process is unaffected."""
    if _previous:
        _, before = _previous.pop()
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def computed_as() -> str | None:
    """cache_token() in words, for identities people read (a local judge's), or None for fp32 on
    the CPU: what every such identity meant before it was recorded, so their cached results stay."""
    token = json.loads(cache_token())
    return None if token == ["cpu", "fp32"] else ", ".join(str(part) for part in token if part is not None)


def cache_token() -> str:
    """What a cached model result depends on besides its inputs: device and precision used; in bf16
    also the kernels and CPU threads, which move bf16 results (docs/benchmarks.md), so a Ray run at
    one thread per task never reuses a base score computed at two."""
    from tasks.runtime import torch_threads

    p = resolve()
    if p.precision == "fp32":
        return json.dumps([p.device, p.precision])
    return json.dumps([p.device, p.precision, kernels(p.device), torch_threads() if p.device == "cpu" else None])
