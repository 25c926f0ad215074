"""Reset triggers: interval, stage boundary, validation plateau, KL threshold."""
from prorl_jax import resets


def test_interval_trigger_counts_from_last_reset():
    t = resets.ResetTracker(interval_steps=3)
    fired = [s for s in range(10) if t.check_step(s) and (t.record_reset(s) or True)]
    assert fired == [3, 6, 9]


def test_stage_boundary_wins():
    t = resets.ResetTracker(interval_steps=100, kl_threshold=0.5)
    assert t.check_step(7, kl=1.0, stage_start=True) == resets.STAGE


def test_kl_threshold():
    t = resets.ResetTracker(kl_threshold=0.01)
    assert t.check_step(5, kl=0.005) is None
    assert t.check_step(5, kl=0.02) == resets.KL
    assert t.check_step(5, kl=None) is None


def test_plateau_after_patience_and_state_round_trip():
    t = resets.ResetTracker(plateau_patience=2)
    for score in (0.5, 0.6, 0.55):
        t.record_validation(score)
    assert t.check_step(10) is None          # one eval without improvement
    t.record_validation(0.6)                 # equal is not better
    assert t.check_step(11) == resets.PLATEAU
    saved = t.state_dict()
    t2 = resets.ResetTracker(plateau_patience=2)
    t2.load_state_dict(saved)
    assert t2.check_step(11) == resets.PLATEAU
    t2.record_reset(11)
    assert t2.check_step(12) is None and t2.best_val is None


def test_tracker_from_the_reset_config():
    t = resets.ResetTracker.from_config(resets.ResetConfig(interval_steps=4, plateau_patience=2,
                                                           kl_threshold=0.3))
    assert (t.interval_steps, t.plateau_patience, t.kl_threshold) == (4, 2, 0.3)
    assert t.check_step(4) == resets.INTERVAL and t.check_step(1, kl=0.5) == resets.KL
