"""The rollout pipeline with vLLM servers (the test double, tests/vllm_double.py): groups
handed on as their requests return, and at k >= 1 the producer thread - every request of
batch t on the weights of version max(floor, t - k) as the servers' load calls show, exact
resume after SIGTERM, a k = 0 checkpoint resumed at k = 1."""
import time

import numpy as np
import pytest

from prorl_jax import build
from prorl_jax.models import hf_tensors
from prorl_jax.pipeline import ThreadedPipeline, round_seed
from prorl_jax.rollout import VLLMClient
from prorl_jax.rollout.vllm_protocol import prompt_seeds
from prorl_jax.rollout.vllm_worker import LOAD_METHOD
from prorl_jax.trainer import Trainer
from test_pipeline import _params, _same_run
from test_trainer import _KillAt, read_metrics, small_config
from vllm_double import VLLMDouble

pytestmark = pytest.mark.usefixtures("trainer_compile_cache")  # conftest.py


class _SlowFirstPrompt(VLLMDouble):
    """Answers requests whose prompt starts with token 5 a second late."""

    def _generate(self, body, aborted):
        if body["prompt"][0][0] == 5:
            time.sleep(1.0)
        return super()._generate(body, aborted)


def test_generate_groups_hands_on_each_group_as_its_request_returns(tmp_path):
    prompts = [[5, 6], [7, 8], [9], [10, 11, 12]]
    request = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, stop_token_ids=[0],
                   seed=3)
    with _SlowFirstPrompt() as double:
        client = VLLMClient([double.url], str(tmp_path / "w"), timeout_s=10.0,
                            health_timeout_s=10.0, check_logprobs_mode=False)
        order = []
        parts = {}
        for i, part in client.generate_groups(prompts, **request):
            order.append(i)
            parts[i] = part
        whole = client.generate(prompts, **request)
        client.close()
    assert order[-1] == 0 and sorted(order) == [0, 1, 2, 3]  # prompt 0 came back last
    for i in range(4):
        assert parts[i].prompt_ids == [prompts[i]]
        assert parts[i].token_ids == whole.token_ids[2 * i:2 * i + 2]
        assert parts[i].finish_reasons == whole.finish_reasons[2 * i:2 * i + 2]
        for a, b in zip(parts[i].logprobs, whole.logprobs[2 * i:2 * i + 2]):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def double():
    """A double serving the demo model's tensor names (zeros until the first sync)."""
    cfg = small_config()
    model = build.build_model(cfg, build.load_tokenizer(cfg))
    tensors = {n: np.zeros_like(x) for n, x in hf_tensors(model, dtype=np.float32)}
    with VLLMDouble(model="tiny", vocab_size=model.config.vocab_size, tensors=tensors,
                    num_workers=1) as server:
        yield server


def _config(double, **overrides):
    return small_config(**{"rollout.engine": "vllm", "rollout.vllm_urls": double.url,
                           "total_steps": 4, **overrides})


def _served_versions(requests, cfg) -> dict:
    """(step, round) -> the weight version the double held when it got that round's
    requests (replayed from its load calls); validation requests left out."""
    n, rounds = cfg.rollout.n, cfg.batch.max_generation_rounds
    seeds = {}
    for t in range(cfg.total_steps):
        for r in range(rounds):
            for s in prompt_seeds(round_seed(cfg.seed, t, r), cfg.batch.prompts_per_step, n):
                seeds[s] = (t, r)
    version, out = 0, {}
    for req in requests:
        if req["path"] == "/collective_rpc" and req["body"].get("method") == LOAD_METHOD:
            version = int(req["body"]["args"][1])
        elif req["path"] == "/v1/completions" and req["body"].get("seed") in seeds:
            out.setdefault(seeds[req["body"]["seed"]], set()).add(version)
    return out


def test_threaded_k1_schedule_and_exact_resume_after_sigterm(tmp_path, double):
    cfg = _config(double, **{"rollout.max_staleness": 1})
    start = len(double.requests)
    straight = Trainer(cfg, str(tmp_path / "a"))
    assert isinstance(straight.pipeline, ThreadedPipeline)
    straight.run()
    straight.close()
    served = _served_versions(double.requests[start:], cfg)
    assert served == {(t, 0): {max(0, t - 1)} for t in range(4)}
    rows = read_metrics(str(tmp_path / "a"))
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1, 1]
    assert "val/toy/pass@1" in rows[1] and "val/toy/pass@1" in rows[3]
    killed = _KillAt(cfg, str(tmp_path / "b"))
    killed.kill_step = 2
    killed.run()
    killed.close()
    assert killed.step == 3
    resumed = Trainer(cfg, str(tmp_path / "b"))
    resumed.run()
    resumed.close()
    _same_run(str(tmp_path / "a"), str(tmp_path / "b"), _params(straight), _params(resumed))


def test_a_k0_checkpoint_resumes_at_k1_with_the_restored_weights(tmp_path, double):
    """The k = 0 checkpoint of step 2 has no batches: at k = 1 batches 2 and 3 both come from
    the restored version 2 (the floor), then the schedule goes on."""
    first = Trainer(_config(double, **{"total_steps": 2}), str(tmp_path))
    first.run()
    first.close()
    cfg = _config(double, **{"rollout.max_staleness": 1, "total_steps": 5})
    start = len(double.requests)
    resumed = Trainer(cfg, str(tmp_path))
    resumed.run()
    resumed.close()
    served = _served_versions(double.requests[start:], cfg)
    assert served == {(2, 0): {2}, (3, 0): {2}, (4, 0): {3}}
    rows = read_metrics(str(tmp_path))
    assert [r["rollout/staleness"] for r in rows] == [0, 0, 0, 1, 1]
    assert [r["rollout/dropped_stale"] for r in rows[2:]] == [0, 0, 0]
