"""Reward shaping, dynamic-sampling group filter and the padded training rows."""
import numpy as np
import pytest

from prorl_jax import batching
from prorl_jax.rollout.base import RolloutBatch


def test_shape_rewards_stop_penalty_and_soft_overlong():
    r = np.array([1.0, 1.0, 0.5, 1.0], np.float32)
    lengths = np.array([10, 90, 95, 100])
    trunc = np.array([False, False, False, True])
    # truncated -> 0; soft overlong with max 100, buffer 20: penalty starts past 80 tokens.
    cfg = batching.RewardConfig(truncated_reward=0.0, soft_overlong_buffer=20,
                                soft_overlong_factor=1.0)
    out = batching.shape_rewards(r, lengths, trunc, max_len=100, cfg=cfg)
    np.testing.assert_allclose(out, [1.0, 1.0 - 10 / 20, 0.5 - 15 / 20, 0.0 - 20 / 20])
    same = batching.shape_rewards(r, lengths, trunc, max_len=100,
                                  cfg=batching.RewardConfig())  # truncated_reward None: off
    np.testing.assert_array_equal(same, r)
    # A penalty below 0 is a value like any other (it used to mean "off").
    neg = batching.shape_rewards(r, lengths, trunc, max_len=100,
                                 cfg=batching.RewardConfig(truncated_reward=-0.5))
    np.testing.assert_array_equal(neg, [1.0, 1.0, 0.5, -0.5])


def test_advantages_follow_the_advantage_config():
    groups = [batching.Group({}, [1], [[2]] * 4, [np.zeros(1)] * 4, ["stop"] * 4,
                             np.array(r, np.float32), np.array(r, np.float32))
              for r in ([1.0, 0.8, 0.0, 0.4], [1.0, 1.0, 1.0, 1.0])]
    adv = batching.advantages(groups, 4, batching.AdvantageConfig())
    centred = np.array([0.45, 0.25, -0.55, -0.15])
    np.testing.assert_allclose(adv[:4], centred / (np.std(centred, ddof=1) + 1e-6), rtol=1e-5)
    assert np.all(adv[4:] == 0)  # identical rewards: exactly 0
    dr_grpo = batching.advantages(groups, 4, batching.AdvantageConfig(std_normalize=False))
    np.testing.assert_allclose(dr_grpo[:4], centred, rtol=1e-5)


def test_informative_groups():
    r = np.array([0, 0, 0, 1, 1, 1, 0.5, 0.5, 0.25], np.float32)
    np.testing.assert_array_equal(batching.informative_groups(r, 3), [False, False, True])


def _rollout():
    return RolloutBatch(prompt_ids=[[5, 6], [7]], n=2,
                        token_ids=[[1, 2, 0], [3], [4, 4], [9, 8, 7, 6]],
                        logprobs=[np.array([-.1, -.2, -.3], np.float32), np.array([-.4], np.float32),
                                  np.array([-.5, -.6], np.float32),
                                  np.array([-.7, -.8, -.9, -1.], np.float32)],
                        finish_reasons=["stop", "stop", "stop", "length"])


def test_build_train_batch_alignment_and_overlong_filter():
    batch = _rollout()
    recs = [{"domain": "toy"}, {"domain": "toy"}]
    groups = batching.split_groups(batch, recs, np.array([1, 0, 0, 1.]), np.array([1, 0, 0, 1.]))
    adv = np.array([0.7, -0.7, -0.7, 0.7], np.float32)
    tb = batching.build_train_batch(groups, adv, pad_id=99, length_bucket=4,
                                    overlong_filter=True, num_rows=6)
    assert tb["input_ids"].shape == (6, 8)  # longest row 1+4=5 -> bucket 8
    np.testing.assert_array_equal(tb["input_ids"][0], [5, 6, 1, 2, 0, 99, 99, 99])
    np.testing.assert_array_equal(tb["targets"][0], [6, 1, 2, 0, 99, 99, 99, 99])
    # Row 0: prompt length 2, so positions 1..3 predict the three response tokens.
    np.testing.assert_array_equal(tb["loss_mask"][0], [0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(tb["sampler_logp"][0, 1:4], [-.1, -.2, -.3])
    np.testing.assert_array_equal(tb["loss_mask"][2], [1, 1, 0, 0, 0, 0, 0, 0])
    # Row 3 was truncated ("length"): filtered out of the loss but its log-probs are kept.
    assert tb["loss_mask"][3].sum() == 0 and tb["sampler_logp"][3, 0] == np.float32(-.7)
    # Padding rows carry nothing.
    assert tb["loss_mask"][4:].sum() == 0 and np.all(tb["advantages"][4:] == 0)
    np.testing.assert_allclose(tb["advantages"][:4], adv)
    # The targets under the mask are exactly the response tokens.
    for i, g in enumerate([r for g in groups for r in g.response_ids][:3]):
        assert list(tb["targets"][i][tb["loss_mask"][i] > 0]) == g


def test_mini_batches_pad_the_last():
    tb = {"x": np.arange(10).reshape(5, 2), "a": np.ones(5, np.float32)}
    parts = batching.mini_batches(tb, 2)
    assert len(parts) == 3 and parts[2]["x"].shape == (2, 2)
    np.testing.assert_array_equal(parts[2]["a"], [1, 0])


def test_num_rows_too_small():
    batch = _rollout()
    groups = batching.split_groups(batch, [{}, {}], np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="num_rows=2 < 4"):
        batching.build_train_batch(groups, np.zeros(4), pad_id=0, length_bucket=4,
                                   overlong_filter=False, num_rows=2)


def test_reward_stats_per_domain():
    stats = batching.reward_stats([{"domain": "math"}, {"domain": "code"}],
                                  np.array([1, 0, .5, .5], np.float32), 2)
    assert stats["reward/mean"] == 0.5 and stats["reward/math/mean"] == 0.5
    assert stats["reward/code/std"] == 0.0 and stats["reward/math/std"] == 0.5
