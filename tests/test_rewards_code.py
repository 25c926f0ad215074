"""Code domain: test matching, and the bubblewrap sandbox against adversarial programs."""
import os
import socket
import threading
import time

import pytest

import rewards
from rewards import code_grader, sandbox
from rewards.sandbox import SandboxLimits, run_tests

TIGHT = SandboxLimits(per_test_timeout_s=1.0, cpu_time_s=2, memory_bytes=256 << 20,
                      max_processes=16, max_output_bytes=64 << 10, tmpfs_bytes=8 << 20,
                      total_timeout_s=2.5)
ADD_TESTS = {"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7", "5\n"]}


def _rec(tests, **extra):
    return {"domain": "code", "tests": tests, **extra}


def _resp(program):
    return f"<think>plan</think>Here:\n```python\n{program}\n```\n"


def _sandbox_uid(uid):
    """A uid the tests of a sandbox run as: one of the per-sandbox uids as root, else nobody."""
    base = SandboxLimits().uid_base
    return base <= uid < base + SandboxLimits().uid_slots if os.geteuid() == 0 else uid == 65534


def _nobody_processes():
    return [p for p in os.listdir("/proc") if p.isdigit() and (_uid(p) or 0) > 0
            and _sandbox_uid(_uid(p))]


def _uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_stdout_and_call_result_matching():
    assert code_grader.stdout_matches("3  \n\n", "3")
    assert code_grader.stdout_matches("1 2\n3", "1 2 3")
    assert code_grader.stdout_matches("0.3333333", "0.33333333")
    assert not code_grader.stdout_matches("3", "4")
    assert code_grader.call_result_matches("[1, 2]", (1, 2))
    assert code_grader.call_result_matches("5", [5])  # APPS wraps results in a list
    assert not code_grader.call_result_matches("true", 1)
    assert not code_grader.call_result_matches("not json", 1)


def test_right_wrong_partial_and_capped():
    right = "a, b = map(int, input().split())\nprint(a + b)"
    partial = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    assert rewards.score(_rec(ADD_TESTS), _resp(right)) == 1.0
    assert rewards.score(_rec(ADD_TESTS), _resp(partial)) == pytest.approx(2 / 3)
    assert rewards.score(_rec(ADD_TESTS, max_tests=2), _resp(partial)) == 1.0
    assert rewards.score(_rec(ADD_TESTS), _resp("print(")) == 0.0  # syntax error
    assert rewards.score(_rec(ADD_TESTS), "</think>no code block") == 0.0
    assert rewards.score(_rec(ADD_TESTS), "```python\n" + right + "\n```") == 0.0  # no </think>


def test_call_based_function_and_solution_class():
    tests = {"fn_name": "twoSum", "inputs": [[[2, 7, 11], 9], [[3, 3], 6]], "outputs": [[0, 1], [[0, 1]]]}
    top = "def twoSum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n" \
          "        if target - x in seen:\n            return [seen[target - x], i]\n" \
          "        seen[x] = i"
    cls = "class Solution:\n    def twoSum(self, nums, target):\n        return (0, 1)"
    assert rewards.score(_rec(tests), _resp(top)) == 1.0
    assert rewards.score(_rec(tests), _resp(cls)) == 1.0
    assert rewards.score(_rec(tests), _resp("def twoSum(n, t):\n    return [1, 0]")) == 0.0


def test_runs_as_a_sandbox_uid_with_an_empty_environment(monkeypatch):
    monkeypatch.setenv("PRORL_SECRET_TOKEN", "hunter2")
    prog = ("import os\nprint(os.getuid(), sorted(os.environ.items()), os.getcwd())\n"
            "for pid in os.listdir('/proc'):\n    try:\n"
            "        print(open(f'/proc/{pid}/environ').read())\n    except OSError:\n"
            "        pass")
    [res] = run_tests(prog, [""], limits=TIGHT)
    assert res["status"] == "ok"
    assert "hunter2" not in res["out"] and "PRORL_SECRET" not in res["out"]
    if os.geteuid() == 0:
        assert _sandbox_uid(int(res["out"].split()[0]))


def test_too_slow_is_cut_at_the_per_test_and_per_response_budgets():
    t0 = time.monotonic()
    res = run_tests("import time\nwhile True: pass", ["", ""], limits=TIGHT)
    assert [r["status"] for r in res] == ["timeout", "timeout"]
    t1 = time.monotonic()
    res = run_tests("import time\ntime.sleep(30)", ["1", "2", "3", "4", "5", "6"], limits=TIGHT)
    # 1 s per test, 2.5 s per response: two full timeouts, a cut third, the rest never start
    assert [r["status"] for r in res] == ["timeout"] * 3 + ["skipped"] * 3
    assert t1 - t0 < 5 and time.monotonic() - t1 < 5


def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    res = run_tests(bomb + "\n", ["", ""], limits=TIGHT)
    assert time.monotonic() - t0 < 8
    assert all(r["status"] in ("timeout", "error") for r in res)
    time.sleep(0.3)
    assert _nobody_processes() == []  # nothing survives the sandbox


def test_huge_allocation_fails_inside_the_limit():
    res = run_tests("x = bytearray(20 * 10**9)\nprint('allocated')", [""], limits=TIGHT)
    assert res[0]["status"] == "error" and "allocated" not in res[0]["out"]


def test_no_network_even_to_the_host_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: _accept(server, accepted), daemon=True).start()
    prog = ("import socket\nfor addr in [('127.0.0.1', %d), ('1.1.1.1', 53)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=0.5); print('connected')\n"
            "    except OSError:\n        print('blocked')") % port
    [res] = run_tests(prog, [""], limits=TIGHT)
    assert res["out"].split() == ["blocked", "blocked"]
    time.sleep(0.2)
    assert accepted == []
    server.close()


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_cannot_write_or_read_host_paths(tmp_path):
    target = tmp_path / "escaped.txt"
    prog = ("import os\nfor p in [%r, '/usr/escaped.txt', '/etc/passwd']:\n"
            "    try:\n        open(p, 'a').write('x'); print('wrote', p)\n"
            "    except OSError:\n        print('denied')\n"
            "print(os.path.exists('/root'), os.path.exists('/work'))") % str(target)
    [res] = run_tests(prog, [""], limits=TIGHT)
    assert res["status"] == "ok"
    lines = res["out"].splitlines()
    assert lines[1:] == ["denied", "denied", "False False"]
    assert not target.exists() and not os.path.exists("/usr/escaped.txt")


def test_killing_the_parent_does_not_stop_the_other_tests():
    prog = ("import os, signal\nn = int(input())\nif n == 0:\n"
            "    for pid in (os.getppid(), 1, -1):\n"
            "        try:\n            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n            pass\nprint(n * 2)")
    res = run_tests(prog, ["0\n", "21\n"], limits=TIGHT)
    assert [r["status"] for r in res] == ["ok", "ok"]
    assert res[1]["out"].strip() == "42"


def test_printing_gigabytes_hits_the_output_cap():
    t0 = time.monotonic()
    [res] = run_tests("while True:\n    print('x' * 100000)", [""], limits=TIGHT)
    assert res["status"] == "output_limit"
    assert len(res["out"]) <= TIGHT.max_output_bytes
    assert time.monotonic() - t0 < 5
    [res] = run_tests("open('big', 'w').write('x' * (32 << 20))\nprint('done')", [""],
                      limits=TIGHT)  # file-size / tmpfs limits
    assert res["status"] == "error" and "done" not in res["out"]


def test_missing_bwrap_refuses_clearly(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(rewards.SandboxUnavailableError, match="bwrap"):
        rewards.score(_rec(ADD_TESTS), _resp("print(3)"))
    with pytest.raises(rewards.SandboxUnavailableError, match="bwrap"):
        run_tests("print(1)", [""])
    with pytest.raises(rewards.SandboxUnavailableError, match="bwrap"):
        rewards.score_batch([_rec(ADD_TESTS)], [_resp("print(3)")])


def test_code_through_the_worker_pool():
    right = "a, b = map(int, input().split())\nprint(a + b)"
    bomb = "import os\nwhile True:\n    os.fork()"
    recs = [_rec(ADD_TESTS, per_test_timeout_s=1.0)] * 3
    r, d = rewards.score_batch(recs, [_resp(right), _resp("print(0)"), _resp(bomb)],
                               return_details=True)
    assert r == [1.0, 0.0, 0.0] and d.num_crashed == 0


NON_ROOT_PROBE = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
limits = sandbox.SandboxLimits(per_test_timeout_s=1.0, cpu_time_s=2, total_timeout_s=3.0)
os.environ["PRORL_SECRET_TOKEN"] = "hunter2"
out = {"uid": os.getuid()}
out["env"] = sandbox.run_tests("import os; print(sorted(os.environ))", [""], limits=limits)
out["sum"] = sandbox.run_tests("print(sum(map(int, input().split())))", ["1 2"], limits=limits)
bomb = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass"
out["bomb"] = sandbox.run_tests(bomb, [""], limits=limits)
out["net"] = sandbox.run_tests(
    "import socket\\ntry:\\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\\n"
    "    print('connected')\\nexcept OSError:\\n    print('blocked')", [""], limits=limits)
print(json.dumps(out))
"""


def test_unprivileged_callers_get_a_user_namespace_sandbox(tmp_path):
    """The non-root path (user namespace): run as uid 65534 via setpriv when we are root."""
    import json
    import shutil
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="rewards-nonroot-")  # readable by the unprivileged uid
    try:
        for name in ("sandbox.py", "sandbox_runner.py"):
            shutil.copy(os.path.join(os.path.dirname(sandbox.__file__), name), work)
        probe = os.path.join(work, "probe.py")
        with open(probe, "w") as f:
            f.write(NON_ROOT_PROBE)
        os.chmod(work, 0o755)
        for name in os.listdir(work):
            os.chmod(os.path.join(work, name), 0o644)
        cmd = ["/usr/bin/python3", probe, os.path.join(work, "sandbox.py")]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=work)
    finally:
        shutil.rmtree(work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["uid"] != 0
    assert out["sum"] == [{"status": "ok", "out": "3\n"}]
    assert "PRORL_SECRET_TOKEN" not in out["env"][0]["out"] and out["env"][0]["status"] == "ok"
    assert out["bomb"][0]["status"] in ("timeout", "error")
    assert out["net"][0]["out"].strip() == "blocked"


def test_code_data_is_validated_without_a_sandbox_but_not_scored(monkeypatch):
    """Data preparation runs where bwrap may be missing; scoring and the trainer's start-up
    check refuse there."""
    from prorl_jax.data import validate_record
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    record = dict(_rec(ADD_TESTS), prompt="add two numbers")
    assert validate_record(record, "row 1") is record
    with pytest.raises(rewards.SandboxUnavailableError, match="bwrap"):
        rewards.check_available({"math", "code"})
    rewards.check_available({"math", "ifeval"})
    with pytest.raises(rewards.RecordError, match="no_such"):
        rewards.check_available({"no_such"})
