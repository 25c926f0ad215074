"""The README's demo, shortened: the tiny policy visibly learns, and the plot command draws it."""
import json
import os
import subprocess
import sys

import numpy as np

from configs import prorl
from prorl_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_learns_and_plots(tmp_path):
    cfg = prorl.get_config("demo")
    cfg.total_steps = 80          # the full demo runs 100; it has learned by about step 70
    cfg.eval.every_steps = 0
    cfg.checkpoint.every_steps = 0
    trainer = Trainer(cfg, str(tmp_path))
    trainer.run()
    trainer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rewards = [json.loads(line)["reward/mean"] for line in f]
    assert len(rewards) == 80
    assert np.mean(rewards[:5]) <= 0.3, rewards
    assert np.mean(rewards[-5:]) >= 0.8, rewards
    out = subprocess.run([sys.executable, "-m", "prorl_jax.plot", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
