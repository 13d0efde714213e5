"""The sandbox contains hostile programs (each scored as a failure while the run goes on) and
passes every canonical HumanEval solution."""

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.benchmarks.humaneval import bundled_file, check, read_problems
from tasks.sandbox import Limits, SandboxUnavailable, run_python

FAST = Limits(timeout_s=5, cpu_s=5)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the uid switch need root")

HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "memory bomb": "x = bytearray(4 * 1024**3)\n",
    "stdout flood": "while True:\n    print('x' * 10000)\n",
    "early exit 0": "import os\nos._exit(0)\n",  # a known way to fake a pass
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_programs_fail_within_their_limits(name):
    started = time.perf_counter()
    result = run_python(HOSTILE[name], FAST)
    assert not result.passed and result.status != "passed"
    assert time.perf_counter() - started < FAST.timeout_s + 5
    assert len(result.stdout) <= FAST.output_bytes + 100


def test_timeout_kills_the_whole_process_group():
    result = run_python("import subprocess, time\nsubprocess.Popen(['sleep', '1000'])\ntime.sleep(1000)\n", Limits(timeout_s=2))
    assert result.status == "timeout"
    assert not [p for p in os.popen("ps -eo args").read().splitlines() if p.strip() == "sleep 1000"]


@needs_root
def test_fork_bomb_is_stopped_by_the_process_limit():
    result = run_python("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not result.passed
    assert "Resource temporarily unavailable" in result.stderr or result.status == "timeout"
    assert int(os.popen("ps -e --no-headers | wc -l").read()) < 500  # nothing left behind


@needs_root
def test_writes_outside_the_work_dir_do_not_land(tmp_path):
    target = tmp_path / "pwned.txt"
    for path in (target, "/tmp/smolflow-pwned.txt"):
        run_python(f"open({str(path)!r}, 'w').write('x')\n", FAST)
        assert not os.path.exists(path)
    inside = run_python("open('here.txt', 'w').write('ok')\nprint(open('here.txt').read())\n", FAST)
    assert inside.passed and "ok" in inside.stdout


@needs_root
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
    server.close()
    assert not result.passed and ("unreachable" in result.stderr or "refused" in result.stderr)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SMOLFLOW_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nassert 'SMOLFLOW_TEST_SECRET' not in os.environ\n", FAST)
    assert result.passed and "hunter2" not in result.stdout and "SECRET" not in result.stdout


@needs_root
def test_killing_the_parent_is_refused():
    result = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", FAST)
    assert not result.passed and "PermissionError" in result.stderr
    assert run_python("print('still here')\n", FAST).passed  # and we are still running


def test_all_164_canonical_solutions_pass():
    problems = read_problems(bundled_file())
    assert len(problems) == 164
    results = check(problems, [p["canonical_solution"] for p in problems], Limits(timeout_s=20), workers=2)
    failed = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, results) if not r.passed]
    assert not failed


@needs_root
def test_all_files_together_are_capped_on_a_tmpfs():
    # 100 files of 1 MiB (each within RLIMIT_FSIZE) must stop at the 16 MiB tmpfs, wherever it writes.
    program = (
        "import errno, os\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(100):\n"
        "        with open(('/dev/shm/f%d' if i % 2 else 'f%d') % i, 'wb') as f:\n"
        "            f.write(b'x' * (1 << 20))\n"
        "        written += 1\n"
        "except OSError as e:\n"
        "    print('stopped after', written, errno.errorcode[e.errno])\n"
        "st = os.statvfs('.')\n"
        "print('cwd', os.getcwd(), 'size', st.f_blocks * st.f_frsize)\n"
        "print('fs', [l.split(' - ')[1].split()[0] for l in open('/proc/self/mountinfo') if l.split()[4] == '/tmp'])\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    written, reason = lines["stopped"].split()[1:]
    assert reason == "ENOSPC" and 10 <= int(written) < 16  # the cap, not the file-size limit, stopped it
    # The work dir is that tmpfs (memory, gone with the run), not a folder on the host's disk.
    assert lines["cwd"] == f"/tmp/work size {16 << 20}" and lines["fs"] == "['tmpfs']"
    assert "tmpfs 16 MiB" in result.isolation


@needs_root
def test_pid_namespace_hides_host_processes_and_their_command_lines():
    secret = f"smolflow-secret-{secrets.token_hex(8)}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", secret])
    try:
        # Readable from the host (so the check below can fail); wait for the exec to have happened:
        # right after the fork the new process's command line is still empty.
        deadline = time.monotonic() + 30
        while secret.encode() not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the holder process never showed its command line"
            time.sleep(0.05)
        program = (
            "import os\n"
            "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "print('pids', pids)\n"
            "for p in pids:\n"
            "    print(open('/proc/%d/cmdline' % p, 'rb').read())\n"
            f"print('host pid visible', os.path.exists('/proc/{holder.pid}/cmdline'))\n"
        )
        result = run_python(program, FAST)
    finally:
        holder.kill()
        holder.wait()
    assert result.passed, result.stderr
    assert "pids [1, 2]" in result.stdout  # PID 1 (smolflow's root init) and the program itself
    assert secret not in result.stdout and "sleep" not in result.stdout
    assert "pidns" in result.isolation


@needs_root
def test_the_wall_clock_limit_counts_from_the_programs_start_not_the_sandboxs_set_up(monkeypatch, tmp_path):
    """On a loaded machine the sandbox's set-up (unshare, PID 1's interpreter, its mounts) took
    seconds, and they counted against HumanEval's 10 s: correct completions timed out. Here a set-up
    2.5 s slow (an unshare that waits first) under a 2 s limit: a program of 0.2 s passes, one that
    sleeps on still times out, 2 s after its start."""
    import shutil

    slow = tmp_path / "unshare"
    slow.write_text(f'#!/bin/sh\nsleep 2.5\nexec {shutil.which("unshare")} "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setenv("SMOLFLOW_UNSHARE", str(slow))
    quick = run_python("import time\ntime.sleep(0.2)\n", Limits(timeout_s=2))
    assert quick.status == "passed" and quick.seconds > 2.5, quick
    endless = run_python("import time\nwhile True:\n    time.sleep(1)\n", Limits(timeout_s=2))  # never ends
    assert endless.status == "timeout" and 4.5 < endless.seconds < 10, endless


def test_missing_unshare_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setenv("SMOLFLOW_UNSHARE", "/nonexistent/unshare")
    with pytest.raises(SandboxUnavailable, match=r"util-linux `unshare`.*SMOLFLOW_SANDBOX=weak"):
        run_python("print(1)\n", FAST)


@pytest.mark.parametrize("typed", ["Weak", "week", "none"])
def test_an_unknown_sandbox_mode_is_an_error_not_a_guess(monkeypatch, typed):
    # as root it silently meant full isolation, without root the refusal said to set what was set
    monkeypatch.setenv("SMOLFLOW_SANDBOX", typed)
    with pytest.raises(SandboxUnavailable, match=rf"SMOLFLOW_SANDBOX='{typed}' is not a sandbox mode: set SMOLFLOW_SANDBOX=weak"):
        run_python("print(1)\n", FAST)


def test_weak_mode_must_be_chosen_and_says_so(monkeypatch):
    monkeypatch.setenv("SMOLFLOW_UNSHARE", "/nonexistent/unshare")
    monkeypatch.setenv("SMOLFLOW_SANDBOX", "weak")
    result = run_python("print('hi')\n", FAST)
    assert result.passed and result.isolation.endswith("rlimits, no namespaces (SMOLFLOW_SANDBOX=weak)")


@pytest.mark.parametrize("mode", ["namespaces", "weak"])
def test_a_program_dies_with_a_sigkilled_parent(mode, tmp_path):
    # Only the parent enforces the wall-clock limit, and a sleeping program never hits RLIMIT_CPU.
    from deployments.local import descendants
    from tasks.leftovers import _running

    if mode == "namespaces" and os.geteuid() != 0:
        pytest.skip("namespaces and the uid switch need root")
    # TMPDIR: the killed parent's sandbox folder stays (test_leftovers: the next sandbox removes it)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(tmp_path)}
    if mode == "weak":
        env |= {"SMOLFLOW_UNSHARE": "/nonexistent/unshare", "SMOLFLOW_SANDBOX": "weak"}
    script = ("from tasks.sandbox import Limits, run_python\n"
              "run_python('import time\\nwhile True: time.sleep(1)\\n', Limits(timeout_s=600))")
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (children := descendants(parent.pid)):
            assert parent.poll() is None and time.monotonic() < deadline, "the program never started"
            time.sleep(0.2)
        time.sleep(1)  # the whole chain (unshare, its init, the program) is up
        children = descendants(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while [pid for pid in children if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _running(pid)], f"outlived their parent: {children}"


def _segments(size: int) -> list[str]:
    """Ids of the host's System V shared memory segments of exactly this size."""
    rows = [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    return [row[1] for row in rows if int(row[3]) == size]


@needs_root
def test_shared_memory_segments_die_with_the_sandbox():
    size = (50 << 20) + 4096 * (1 + secrets.randbelow(1000))  # a size no one else uses: how we find it
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        f"shmid = libc.shmget(0, {size}, 0o1000 | 0o644)\n"  # IPC_PRIVATE, IPC_CREAT
        "assert shmid >= 0, ctypes.get_errno()\n"
        "address = libc.shmat(shmid, None, 0)\n"
        f"ctypes.memset(address, 1, {size})\n"
        "libc.shmdt(ctypes.c_void_p(address))\n"
    )
    try:
        result = run_python(program, FAST)
        assert result.passed, result.stderr
        assert not _segments(size), "the segment outlived the sandbox on the host"
        assert "ipcns" in result.isolation
    finally:
        for shmid in _segments(size):  # without --ipc: remove what it left
            subprocess.run(["ipcrm", "-m", shmid], check=False)


FORK_AND_HOLD = """import os, select, time
r, w = os.pipe()
children = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        try:
            held = b'x' * (600 << 20)
            os.write(w, b'1')
            time.sleep(3)
            os._exit(0)
        except BaseException:
            os._exit(1)
    children.append(pid)
got, deadline = b'', time.time() + 10
while len(got) < 4 and time.time() < deadline:
    if select.select([r], [], [], 0.5)[0]:
        got += os.read(r, 4)
print('held', len(got))
codes = [os.waitpid(p, 0)[1] for p in children]
assert len(got) == 4 and not any(codes), codes
"""


def _cgroups_left() -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/**/smolflow-sandbox-{os.getpid()}-*")]


@needs_root
@pytest.mark.parametrize("bound", ["cgroup", "rlimits"])
def test_memory_limit_bounds_the_whole_sandbox_not_each_process(bound, monkeypatch, tmp_path):
    # 4 children holding 600 MiB each: 2.4 GiB against memory_mb=1024 (per process it fits).
    import tasks.sandbox_cgroup

    if bound == "cgroup" and not os.access("/sys/fs/cgroup/memory", os.W_OK):
        pytest.skip("no writable cgroup v1 memory controller here")
    if bound == "rlimits":
        monkeypatch.setattr(tasks.sandbox_cgroup, "_CGROUPS", tmp_path / "no-cgroups")
    limits = Limits(timeout_s=30, cpu_s=20)
    result = run_python(FORK_AND_HOLD, limits)
    assert not result.passed and "held 4" not in result.stdout, (result.status, result.stdout, result.stderr[-500:])
    if bound == "cgroup":
        assert "cgroup memory 1040 MiB + pids 16" in result.isolation
        # One process may still use most of it: the cgroup bounds the total, not each process.
        assert run_python("held = b'x' * (700 << 20)\n", limits).passed
    else:
        assert "no writable cgroup: rlimits 4 processes x 256 MiB" in result.isolation
    assert not _cgroups_left()


@needs_root
def test_weak_mode_as_root_drops_root_and_kills_every_descendant(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLFLOW_UNSHARE", "/nonexistent/unshare")
    monkeypatch.setenv("SMOLFLOW_SANDBOX", "weak")
    monkeypatch.setenv("SMOLFLOW_TEST_SECRET", "hunter2")
    mark = f"1000.{secrets.randbelow(10**9)}"  # the grandchild's `sleep` argument: how we find it
    program = (
        "import os, time\n"
        "print('uid', os.getuid())\n"
        "for path, mode in (('/proc/' + str(os.getppid()) + '/environ', 'rb'), (%r, 'w')):\n"
        "    try:\n"
        "        open(path, mode).close()\n"
        "        print('reached', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # a daemon: out of the process group, re-parented to init
        "    if os.fork() == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', %r])\n"
        "    os._exit(0)\n"
        "time.sleep(100)\n"  # the sandboxed program outlives its 3 s limit: the test waits ~3 s, not 100
    ) % (str(tmp_path / "pwned"), mark)
    try:
        started = time.monotonic()
        result = run_python(program, Limits(timeout_s=3))
        assert time.monotonic() - started < 30  # cut at its 3 s limit, not after its 100 s sleep
        time.sleep(0.5)
        left = [p for p in os.popen("ps -eo pid,args").read().splitlines() if p.split()[1:] == ["sleep", mark]]
        assert result.status == "timeout"
        assert "uid 0\n" not in result.stdout and "reached" not in result.stdout, result.stdout
        assert not (tmp_path / "pwned").exists()
        assert not left, f"a setsid'd grandchild outlived the timeout: {left}"
        assert result.isolation.startswith("uid ")
    finally:
        for line in os.popen("ps -eo pid,args").read().splitlines():
            if line.split()[1:] == ["sleep", mark]:
                os.kill(int(line.split()[0]), 9)


@needs_root
def test_no_new_user_namespaces_but_processes_and_threads_work():
    program = (
        "import ctypes, subprocess, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print('unshare -U', subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode)\n"
        "t = threading.Thread(target=print, args=('thread ran',))\n"
        "t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'child ran'], capture_output=True, text=True).stdout.strip())\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert "unshare -1 1\n" in result.stdout and "unshare -U 0" not in result.stdout  # EPERM
    assert "thread ran" in result.stdout and "child ran" in result.stdout


# A completion the auditor used: it reads the end-of-program marker from stdin, prints it, and
# leaves before the tests run.
ECHO_MARKER = ("    return None\nimport sys as _s, os as _o\n_t = _s.stdin.readline().strip()\n"
               "_s.stdout.write('\\n'+_t+'\\n'); _s.stdout.flush()\n_o._exit(0)\n")


def test_echoing_stdin_does_not_fake_a_humaneval_pass():
    from tasks.benchmarks.humaneval import HumanEval

    problems = read_problems(bundled_file())[:3]
    records, _ = HumanEval().score(problems, [ECHO_MARKER] * 3)
    assert not [r["doc_id"] for r in records if r["correct"]]
    assert all({"reads stdin", "os._exit"} <= set(r["tamper_signs"]) for r in records)
    clean, _ = HumanEval().score(problems[:1], [problems[0]["canonical_solution"]])
    assert clean[0]["correct"] and clean[0]["tamper_signs"] == []


# Audit (2026-12-05) regressions: a program's own death, the keyring, /run's sockets, the uid.

@pytest.mark.parametrize("mode", ["namespaces", "weak"])
def test_a_real_time_signal_is_a_failure_not_a_crash_of_the_evaluation(mode, monkeypatch):
    if mode == "namespaces" and os.geteuid() != 0:
        pytest.skip("namespaces and the uid switch need root")
    if mode == "weak":
        monkeypatch.setenv("SMOLFLOW_SANDBOX", "weak")
    result = run_python("import os\nos.kill(os.getpid(), 40)\n", FAST)  # signal.Signals(40) has no member
    assert not result.passed and result.status == "killed by SIGRTMIN+6" and result.returncode == -40


def _keyctl(*args):
    import ctypes

    return ctypes.CDLL(None, use_errno=True).syscall(*args)


@needs_root
@pytest.mark.parametrize("mode", ["namespaces", "weak"])
def test_the_session_keyring_is_not_shared(mode, monkeypatch):
    # As systemd (KeyringMode=private) and runc give a service: a session keyring of its own.
    if mode == "weak":
        monkeypatch.setenv("SMOLFLOW_SANDBOX", "weak")
    # add_key and keyctl on the two machines the sandbox's seccomp filter knows (tasks/sandbox_init.py)
    add_key, keyctl = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
    script = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"libc.syscall({keyctl}, 1, None)\n"  # KEYCTL_JOIN_SESSION_KEYRING
        "v = b'smolflow-parent-secret'\n"
        f"libc.syscall({add_key}, b'user', b'parent', v, len(v), -3)\n"
        "from tasks.sandbox import Limits, run_python\n"
        "read = ('import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\nb = ctypes.create_string_buffer(64)\\n'\n"
        f"        'k = libc.syscall({keyctl}, 10, -3, b\"user\", b\"parent\", 0)\\n'\n"
        f"        'print(b.raw[:max(libc.syscall({keyctl}, 11, k, b, 64), 0)])\\n'\n"
        f"        'print(libc.syscall({add_key}, b\"user\", b\"planted\", b\"x\", 1, -3))\\n')\n"
        "first, second = run_python(read, Limits(timeout_s=5)), run_python(read, Limits(timeout_s=5))\n"
        "print(first.stdout, second.stdout)\n"
        f"libc.syscall({keyctl}, 10, -3, b'user', b'planted', 0) < 0 or sys.exit('a program wrote into our keyring')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert "smolflow-parent-secret" not in out.stdout


@needs_root
def test_unix_sockets_of_host_services_are_out_of_reach():
    path = f"/run/smolflow-test-{os.getpid()}.sock"  # /run: where D-Bus, PostgreSQL and Docker listen
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen()
        result = run_python(f"import socket\nsocket.socket(socket.AF_UNIX).connect({path!r})\n", FAST)
        assert not result.passed and "FileNotFoundError" in result.stderr
        assert run_python("open('/run/lock/x', 'w').write('ok')\n", FAST).passed  # /run/lock stays writable
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


@needs_root
def test_the_cgroup_name_holds_no_part_of_the_token(monkeypatch):
    import tasks.sandbox

    tokens = []
    real = tasks.sandbox.secrets.token_hex
    monkeypatch.setattr(tasks.sandbox.secrets, "token_hex", lambda n=None: tokens.append(real(n)) or tokens[-1])
    result = run_python("print(open('/proc/self/cgroup').read())\n", FAST)
    assert result.passed
    assert not any(t[:8] in result.stdout for t in tokens if len(t) == 32)


@needs_root
def test_the_sandbox_uid_is_one_no_process_uses(monkeypatch):
    import random

    taken = 231_073  # say a rootless container's subordinate uid, with a process running
    holder = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: (os.setgid(taken), os.setuid(taken)))
    try:
        draws = iter([taken, taken + 1])
        monkeypatch.setattr(random, "randrange", lambda a, b: next(draws))
        result = run_python("import os\nprint(os.getuid())\n", FAST)
        assert result.passed and str(taken + 1) in result.stdout
        assert holder.poll() is None, "the sandbox's clean-up killed a process that was not its own"
    finally:
        holder.kill()
        holder.wait()


def test_completions_that_fake_a_pass_are_flagged():
    from tasks.benchmarks.humaneval import tamper_signs

    steal = ("    import inspect as _i\n"
             "    _f = [x.frame for x in _i.stack() if 'token' in _i.getargvalues(x.frame).locals][0]\n"
             "    raise SystemExit\n")
    assert {"frames/gc", "sys.exit"} <= set(tamper_signs(steal))
    assert "__eq__ override" in tamper_signs("    return type('R', (), {'__eq__': lambda s, o: True})()\n")
    assert not [p["task_id"] for p in read_problems(bundled_file()) if tamper_signs(p["canonical_solution"])]
