"""Training-curve plotting (prorl_jax/plot.py) and the override sweep (launchers/sweep.py)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures.launcher import load_launcher

from prorl_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_MAIN = os.path.join(ROOT, "tests", "fixtures", "fake_main.py")
RESET_RED = np.array([0.839, 0.153, 0.157])  # matplotlib "tab:red"




sweep = load_launcher("sweep")


def _synthetic_metrics(workdir, steps=40, resets=(15, 30), partial_tail=False):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "reward/mean": min(1.0, s / steps + 0.05 * math.sin(s)),
                   "entropy": 1.5 / (1 + 0.1 * s), "kl": 1e-3 * (s % 15),
                   "response_length/mean": 20 + s, "loss/policy": 0.0,
                   "reference_resets": sum(r <= s for r in resets)}
            if s in resets:
                row["reset/trigger"] = "interval" if s == resets[0] else "kl_threshold"
            f.write(json.dumps(row) + "\n")
            if s % 10 == 0:
                f.write("\n" + json.dumps({"step": s, "val/toy/pass@1": s / steps}) + "\n")
        if partial_tail:
            f.write('{"step": 41, "reward/me')
    return path


def _red_pixels(png):
    import matplotlib.image
    img = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(img - RESET_RED).max(axis=-1) < 0.05).sum()), img


# ---------------------------------------------------------------- reading metrics

def test_read_metrics_skips_blank_and_partial_last_line(tmp_path):
    _synthetic_metrics(tmp_path, steps=20, partial_tail=True)
    rows = plot.read_metrics(str(tmp_path))
    assert len(rows) == 20 + 2  # 20 training lines + 2 validation lines
    steps, values = plot.series(rows, "val/toy/pass@1")
    assert steps == [10, 20] and values == [0.5, 1.0]
    assert plot.resets(rows) == [(15, "interval")]


def test_series_skips_missing_and_non_finite():
    rows = [{"step": 1, "kl": 0.5}, {"step": 2}, {"step": 3, "kl": float("nan")},
            {"step": 4, "kl": True}, {"step": 5, "kl": 2}]
    assert plot.series(rows, "kl") == ([1, 5], [0.5, 2.0])


def test_bad_metrics_files(tmp_path):
    with pytest.raises(plot.MetricsError, match="not found"):
        plot.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(plot.MetricsError, match="metrics.jsonl line 2"):
        plot.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"kl": 3}\n')
    with pytest.raises(plot.MetricsError, match="line 2: expected a JSON object with a numeric 'step'"):
        plot.read_metrics(str(tmp_path))


# ---------------------------------------------------------------- plotting

def test_plot_cli_writes_png_with_resets_marked(tmp_path):
    _synthetic_metrics(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "prorl_jax.plot", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    red, img = _red_pixels(str(png))
    assert img.shape[0] >= 500 and img.shape[1] >= 1000
    assert img.std() > 0.05  # not blank
    # the same curves without resets have no reset-red pixels
    _synthetic_metrics(tmp_path / "noreset", resets=())
    plain = plot.plot_curves(plot.read_metrics(str(tmp_path / "noreset")),
                             str(tmp_path / "plain.png"))
    assert red > 200 and _red_pixels(plain)[0] == 0
    assert "2 resets" in out.stdout


def test_plot_empty_metrics_is_an_error(tmp_path):
    with pytest.raises(plot.MetricsError, match="no metrics"):
        plot.plot_curves([], str(tmp_path / "x.png"))


# ---------------------------------------------------------------- sweep

def test_parse_grid_and_points():
    grid = sweep.parse_grid(["loss.eps_high=0.28,0.4", "loss.beta=0, 1e-4", "seed=1"])
    assert grid == [("loss.eps_high", ["0.28", "0.4"]), ("loss.beta", ["0", "1e-4"]),
                    ("seed", ["1"])]
    points = sweep.grid_points(grid)
    assert points == [{"loss.eps_high": a, "loss.beta": b, "seed": "1"}
                      for a in ("0.28", "0.4") for b in ("0", "1e-4")]
    assert sweep.run_name(points[1]) == "eps_high=0.28_beta=1e-4_seed=1"
    assert sweep.run_name({"a.lr": "1", "b.lr": "2"}) == "a.lr=1_b.lr=2"
    for bad in ["loss.beta", "loss beta=1", "loss.beta=1,,2", "=1"]:
        with pytest.raises(ValueError, match="--grid"):
            sweep.parse_grid([bad])
    with pytest.raises(ValueError, match="given twice"):
        sweep.parse_grid(["a=1", "a=2"])


def test_sweep_dry_run_prints_commands(tmp_path, capsys):
    rc = sweep.main(["--config=configs/prorl.py:demo", "--grid", "loss.eps_high=0.28,0.4",
                     "--grid", "loss.beta=0,1e-4", f"--workdir={tmp_path}", "--dry-run",
                     "--program", "train", "--", "--config.total_steps=7"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 4
    assert lines[0] == (f"train --config=configs/prorl.py:demo --workdir={tmp_path}/eps_high=0.28_beta=0"
                        " --config.loss.eps_high=0.28 --config.loss.beta=0 --config.total_steps=7")
    assert not os.listdir(tmp_path)


def test_sweep_runs_grid_and_writes_summary(tmp_path):
    program = f"{sys.executable} {FAKE_MAIN}"
    rc = sweep.main(["--config=cfg.py", "--grid", "loss.eps_high=0.2,0.4",
                     "--grid", "loss.beta=0,1e-4", "--grid", "fail=0,1",
                     f"--workdir={tmp_path}", "--parallel", "3", "--program", program,
                     "--", "--config.total_steps=20"])
    assert rc == 1  # the fail=1 runs exit 3
    runs = json.load(open(tmp_path / "sweep.json"))
    assert len(runs) == 8
    assert sorted(r["returncode"] for r in runs) == [0] * 4 + [3] * 4
    args = json.load(open(tmp_path / "eps_high=0.4_beta=1e-4_fail=0" / "args.json"))
    assert args == ["--config=cfg.py", f"--workdir={tmp_path}/eps_high=0.4_beta=1e-4_fail=0",
                    "--config.loss.eps_high=0.4", "--config.loss.beta=1e-4",
                    "--config.fail=0", "--config.total_steps=20"]
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in summary.splitlines() if line.startswith("| eps_high")}
    # columns: name, returncode, steps, reward_final, reward_best, reward_last_tenth, kl_final,...
    ok = rows["eps_high=0.4_beta=1e-4_fail=0"]
    assert ok[1:3] == ["0", "20"]
    assert float(ok[3]) == pytest.approx(0.4 * 0.9) and float(ok[4]) == pytest.approx(0.36)
    assert float(ok[5]) == pytest.approx(0.4 * 0.9 * (19 + 20) / 2 / 20)  # last 2 of 20 steps
    assert float(ok[6]) == pytest.approx(0.2)  # kl at step 20
    assert ok[-1].rstrip(" |") == "1"  # resets
    failed = rows["eps_high=0.2_beta=0_fail=1"]
    assert failed[1] == "3" and failed[2] == "-"
    assert "Runs without metrics" in summary
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- cluster launchers

def _fake_bin(tmp_path, scripts):
    """Executables on a temporary PATH (stand-ins for scontrol/srun/curl/vllm/python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("script", ["slurm_h100.sbatch", "tpu_pod.sh"])
def test_launcher_syntax(script):
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, "launchers", script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_slurm_launcher_starts_servers_and_trainer(tmp_path):
    log = tmp_path / "calls.log"
    path = _fake_bin(tmp_path, {
        "scontrol": "printf 'gpu01\\ngpu02\\ngpu03\\n'\n",
        # run the step locally: drop srun's options, process id 0
        "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; '
                'esac; done\nSLURM_PROCID=0 exec "$@"\n',
        # healthy once that port's fake server has started (as the real /health would be)
        "curl": 'url="${@: -1}"; port="${url##*:}"; port="${port%%/*}"\n'
                f'for i in $(seq 200); do grep -q -- "--port $port " {log} && exit 0; '
                'sleep 0.05; done; exit 7\n',
        "fakevllm": f'echo "vllm CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> {log}\n',
        "fakepython": f'echo "trainer $*" >> {log}\n',
        "getent": 'echo "10.0.0.3       STREAM $2"\n',  # the node's cluster address
    })
    env = dict(os.environ, PATH=path, SLURM_JOB_NODELIST="gpu[01-03]", SLURM_SUBMIT_DIR=ROOT,
               MODEL_PATH="/models/m", WORKDIR=str(tmp_path / "run"), TRAIN_NODES="2",
               VLLM_TP="2", VLLM="fakevllm", PYTHON="fakepython")
    out = subprocess.run(["bash", os.path.join(ROOT, "launchers", "slurm_h100.sbatch"),
                          "--config.total_steps=7"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    servers = sorted(c for c in calls if c.startswith("vllm"))
    assert len(servers) == 4  # 8 GPUs / TP 2 on the one serving node
    for s, gpus in enumerate(["0,1", "2,3", "4,5", "6,7"]):
        assert servers[s].startswith(f"vllm CUDA_VISIBLE_DEVICES={gpus} serve /models/m")
        assert f"--port {8000 + s}" in servers[s] and "--tensor-parallel-size 2" in servers[s]
        assert "--host 10.0.0.3 " in servers[s]  # bound to that address, not 0.0.0.0
    trainer = [c for c in calls if c.startswith("trainer")]
    assert trainer == [
        "trainer -m prorl_jax.main --config=configs/prorl.py "
        f"--workdir={tmp_path}/run --coordinator_address=gpu01:12355 --num_processes=2 "
        "--config.model.path=/models/m --config.rollout.engine=vllm "
        "--config.rollout.vllm_urls=http://gpu03:8000,http://gpu03:8001,http://gpu03:8002,"
        f"http://gpu03:8003 --config.rollout.weights_dir={tmp_path}/run/policy_weights "
        "--config.total_steps=7 --process_id=0"]


def test_slurm_launcher_refuses_too_few_nodes(tmp_path):
    path = _fake_bin(tmp_path, {"scontrol": "printf 'gpu01\\ngpu02\\n'\n"})
    env = dict(os.environ, PATH=path, SLURM_JOB_NODELIST="gpu[01-02]", SLURM_SUBMIT_DIR=ROOT,
               MODEL_PATH="/m", WORKDIR=str(tmp_path), TRAIN_NODES="2")
    out = subprocess.run(["bash", os.path.join(ROOT, "launchers", "slurm_h100.sbatch")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "need more than TRAIN_NODES=2" in out.stderr


def test_tpu_launcher_runs_same_command_on_all_workers(tmp_path):
    log = tmp_path / "gcloud.log"
    path = _fake_bin(tmp_path, {"gcloud": f'printf "%s\\n" "$*" >> {log}\n'})
    env = dict(os.environ, PATH=path, TPU_NAME="pod", ZONE="us-x", WORKDIR="gs://b/run",
               MODEL_PATH="/mnt/m", SETUP="1")
    out = subprocess.run(["bash", os.path.join(ROOT, "launchers", "tpu_pod.sh"),
                          "--config.total_steps=9"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    setup, train = log.read_text().splitlines()
    assert setup.startswith("compute tpus tpu-vm ssh pod --zone=us-x --worker=all --command=")
    assert "pip install -q -e '.[tpu]'" in setup
    assert train == ("compute tpus tpu-vm ssh pod --zone=us-x --worker=all --command=cd "
                     "~/prorl-jax && python3 -m prorl_jax.main --config=configs/prorl.py "
                     "--workdir=gs://b/run --config.rollout.engine=jax "
                     "--config.model.path=/mnt/m --config.total_steps=9 ")
    missing = subprocess.run(["bash", os.path.join(ROOT, "launchers", "tpu_pod.sh")],
                             env=dict(env, TPU_NAME=""), capture_output=True, text=True)
    assert missing.returncode != 0 and "TPU_NAME" in missing.stderr
