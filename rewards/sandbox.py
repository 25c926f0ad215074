"""Run untrusted Python programs against tests inside a bubblewrap (`bwrap`) sandbox.

One sandbox start per response; all its tests run inside it (see `sandbox_runner.py`), each in a
fresh child with a per-test wall-clock timeout, killed with its whole process group on timeout.

Isolation (host side, this module):
- new network, pid, ipc, uts and cgroup namespaces (no network at all, only sandbox processes
  visible, `kill(-1)` cannot reach the host), a new session (no terminal injection),
  `--die-with-parent`, an empty environment (`--clearenv`);
- filesystem: read-only /usr (with the /lib, /lib64, /bin links), the runner file read-only, a
  size-capped tmpfs /tmp as the only writable place; no host path is writable or even visible
  beyond /usr;
- as root (CI): no user namespace, the runner keeps only CAP_SETUID/SETGID/KILL and each test
  child drops to a uid of its own sandbox (`rewards.uid_slots`: one uid per concurrently running
  sandbox, from `uid_base`), so RLIMIT_NPROC applies per sandbox and one response's processes
  cannot use up another's; after each test the runner kills every process the test left behind
  (`kill(-1)` in the sandbox's pid namespace), so each test starts with the whole budget;
  without root: a user namespace maps the caller to `uid` and RLIMIT_NPROC is set above the
  caller's current process count (all of the caller's sandboxes then share that count);
- per test rlimits: address space, CPU seconds, processes, file size, open files, no core dumps;
  captured output capped at `max_output_bytes` (the child is killed past it).
Without `bwrap` on PATH, `run_tests` raises SandboxUnavailableError: untrusted code is never run
unsandboxed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import marshal
import os
import shutil
import signal
import subprocess

RUNNER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
SANDBOX_RUNNER = "/sandbox/runner.py"
BWRAP_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # nothing of the caller's environment
STARTUP_BUDGET_S = 5.0  # wall time allowed for the sandbox and interpreter to start


class SandboxUnavailableError(RuntimeError):
    """bubblewrap (or the sandbox interpreter) is missing: code cannot be scored safely."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed test run (each test gets all of them afresh)."""

    per_test_timeout_s: float = 4.0  # wall-clock per test; the process group is killed past it
    cpu_time_s: int = 5  # RLIMIT_CPU per test child
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process (1 GiB)
    max_processes: int = 32  # RLIMIT_NPROC of each sandbox's own uid (threads count)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE (largest file a test may write)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # captured stdout (or call result) per test
    total_timeout_s: float = 20.0  # per response: tests not started within it count as failed
    tmpfs_bytes: int = 64 << 20  # size of the sandbox's writable /tmp
    uid: int = 65534  # without root: the uid the caller is mapped to inside the sandbox
    uid_base: int = 2_000_000_000  # as root: first of the per-sandbox uids the tests run as
    uid_slots: int = 256  # as root: how many sandboxes may run at once on the machine
    python: str = "/usr/bin/python3"  # interpreter inside the sandbox (must live under /usr)


def find_bwrap() -> str:
    """Path of `bwrap`; SandboxUnavailableError if it is not on PATH."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            "code scoring needs bubblewrap: `bwrap` was not found on PATH "
            "(install it: apt-get install -y bubblewrap). Refusing to run untrusted code "
            "without a sandbox."
        )
    return path


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def bwrap_command(limits: SandboxLimits, privileged: bool) -> list[str]:
    """The bwrap argv that starts the runner (see module docstring for what each part does)."""
    if not limits.python.startswith("/usr/") or not os.path.exists(limits.python):
        raise SandboxUnavailableError(
            f"SandboxLimits.python: {limits.python!r} must be an existing interpreter under /usr "
            "(readable by the sandbox uid); install python3 from the system packages"
        )
    cmd = [find_bwrap()]
    if privileged:
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    else:
        cmd += ["--unshare-all", "--uid", str(limits.uid), "--gid", str(limits.uid)]
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for link in ("lib", "lib64", "bin", "sbin"):
        target = os.path.join("/", link)
        if os.path.islink(target):
            cmd += ["--symlink", os.readlink(target), target]
        elif os.path.isdir(target):
            cmd += ["--ro-bind", target, target]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size",
            str(limits.tmpfs_bytes), "--tmpfs", "/tmp", "--ro-bind", RUNNER_PATH, SANDBOX_RUNNER,
            "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
            limits.python, "-I", "-S", "-B", SANDBOX_RUNNER]
    return cmd


def response_budget_s(num_tests: int, limits: SandboxLimits) -> float:
    """Wall time the tests of one response may take inside the sandbox (seconds)."""
    per_test = limits.per_test_timeout_s + 0.5  # 0.5 s: fork, kill and reap
    return min(num_tests * per_test, limits.total_timeout_s + per_test)


def _job(program: str, inputs: list, fn_name: str | None, limits: SandboxLimits,
         privileged: bool, uid: int) -> bytes:
    nproc = limits.max_processes
    if not privileged:  # RLIMIT_NPROC counts all the caller's processes
        nproc += _count_user_processes(os.getuid())
    job = {
        "program": program, "fn_name": fn_name, "inputs": inputs,
        "per_test_timeout_s": limits.per_test_timeout_s,
        "rlimits": {"AS": limits.memory_bytes, "CPU": limits.cpu_time_s, "NPROC": nproc,
                    "FSIZE": limits.max_file_bytes, "NOFILE": limits.max_open_files},
        "max_output_bytes": limits.max_output_bytes, "total_timeout_s": limits.total_timeout_s,
        "drop_to_uid": uid if privileged else None,
    }
    return marshal.dumps(job)


def run_tests(program: str, inputs: list, *, fn_name: str | None = None,
              limits: SandboxLimits = SandboxLimits(), stats: dict | None = None) -> list[dict]:
    """Run `program` on every test input inside one sandbox.

    Args:
      program: Python source (untrusted).
      inputs: [num_tests] stdin strings (fn_name None) or argument lists (call-based).
      fn_name: function to call (top-level or `Solution().fn_name`), or None for stdin/stdout.
      stats: if given, receives "sandbox_cpu_s" (CPU seconds of the runner and its tests, as the
        runner measured them: the sandbox's set-up in bwrap is not included).
    Returns:
      [num_tests] dicts {"status": "ok"|"error"|"timeout"|"output_limit"|"spawn_failed"|
      "skipped"|"sandbox_failed", "out": captured stdout (or the call's JSON result)}.
    """
    privileged = os.geteuid() == 0
    cmd = bwrap_command(limits, privileged)
    if privileged:  # imported here: this module also runs standalone (tests, without rewards/)
        from rewards import uid_slots

        slot = uid_slots.acquire(limits.uid_base, limits.uid_slots, wait_s=STARTUP_BUDGET_S)
    else:
        slot = contextlib.nullcontext(limits.uid)
    with slot as uid:
        job = _job(program, inputs, fn_name, limits, privileged, uid)
        raw = _run_bwrap(cmd, job, STARTUP_BUDGET_S + response_budget_s(len(inputs), limits))
    return _parse_results(raw, len(inputs), stats if stats is not None else {})


def _run_bwrap(cmd: list[str], job: bytes, total_s: float) -> bytes:
    """Run one sandbox on `job`, killed past `total_s`; returns what the runner wrote."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=BWRAP_ENV)  # bwrap's own environ is readable in /proc/1
    try:
        raw, _ = proc.communicate(job, timeout=total_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        raw, _ = proc.communicate()  # what the runner printed before the deadline
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return raw


def _parse_results(raw: bytes, num_tests: int, stats: dict) -> list[dict]:
    """Decode the runner's length-prefixed marshal records; missing tests -> "sandbox_failed"."""
    results = [{"status": "sandbox_failed", "out": ""} for _ in range(num_tests)]
    pos = 0
    while pos + 8 <= len(raw):
        size = int.from_bytes(raw[pos:pos + 8], "little")
        body, pos = raw[pos + 8:pos + 8 + size], pos + 8 + size
        if len(body) < size:
            break  # truncated by a kill mid-write
        try:
            item = marshal.loads(body)
            if item["i"] == -1:
                stats["sandbox_cpu_s"] = float(item["cpu_s"])
                continue
            results[int(item["i"])] = {"status": str(item["status"]), "out": str(item["out"])}
        except (ValueError, EOFError, TypeError, KeyError, IndexError):
            continue
    return results
