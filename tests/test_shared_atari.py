"""Env facts of the Atari-100k protocol (spec §6, §9.9) on real ALE games, and the score tables."""

import numpy as np
import pytest

from shared.atari import (
    GAMES,
    HUMAN_SCORES,
    RANDOM_SCORES,
    game_name,
    human_normalized_score,
    make_env,
)


def step_until(env, cond, max_steps=3000, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(max_steps):
        obs, r, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
        if cond(obs, r, term, trunc, info):
            return obs, r, term, trunc, info
    raise AssertionError("condition never met")


def test_obs_shape_dtype_zero_padded_reset_and_protocol_settings():
    env = make_env("BreakoutNoFrameskip-v4", seed=0)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert (obs[:3] == 0).all() and obs[3].max() > 0  # SPR zero-pads the stack at a reset
    ale = env.unwrapped.ale
    assert ale.getInt("max_num_frames_per_episode") == 108_000  # 27k agent steps
    assert ale.getFloat("repeat_action_probability") == 0.0  # no sticky actions
    assert 1 <= info["episode_frame_number"] <= 30  # 1..30 no-op frames at the start


def test_frame_counter_advances_by_four_per_step():
    env = make_env("PongNoFrameskip-v4", seed=1)
    _, info = env.reset(seed=1)
    frames = [info["episode_frame_number"]]
    for a in [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]:
        _, _, term, trunc, info = env.step(a)
        assert not (term or trunc)
        frames.append(info["episode_frame_number"])
    assert np.all(np.diff(frames) == 4)


def test_life_loss_sets_done_without_resetting_the_game():
    env = make_env("BreakoutNoFrameskip-v4", seed=2)
    env.reset(seed=2)
    obs, _, term, trunc, info = step_until(env, lambda o, r, te, tr, i: te or tr, seed=2)
    assert term and not trunc and info["life_loss"] and info["lives"] == 4
    frame_before = info["episode_frame_number"]
    obs2, info2 = env.reset()  # what the training loop does after a done
    assert info2["lives"] == 4 and info2["episode_frame_number"] == frame_before  # same game goes on
    assert (obs2[:3] == 0).all() and (obs2[3] == obs[3]).all()  # stack restarts zero-padded
    _, _, _, _, info3 = env.step(0)
    assert info3["episode_frame_number"] == frame_before + 4


def test_eval_env_keeps_playing_through_life_loss_with_raw_rewards():
    env = make_env("MsPacmanNoFrameskip-v4", seed=3, train=False)
    env.reset(seed=3)
    _, r, term, *_ = step_until(env, lambda o, r, te, tr, i: r > 1, seed=3)  # a dot is worth 10
    assert r == 10 and not term
    _, _, term, trunc, info = step_until(env, lambda o, r, te, tr, i: i["lives"] < 3 or te or tr, seed=4)
    assert not (term or trunc) and "life_loss" not in info


def test_episode_cap_truncates_and_reports_raw_game_return():
    env = make_env("BreakoutNoFrameskip-v4", seed=4, train=False, max_episode_frames=400)
    env.reset(seed=4)
    _, _, term, trunc, info = step_until(env, lambda o, r, te, tr, i: te or tr, max_steps=200)
    assert trunc and not term and info["episode_frame_number"] == 400
    assert "episode" in info and info["episode"]["l"] <= 100


def test_score_tables_and_hns():
    assert len(GAMES) == 26 and set(RANDOM_SCORES) == set(HUMAN_SCORES) == set(GAMES)
    assert (RANDOM_SCORES["Pong"], HUMAN_SCORES["Pong"]) == (-20.7, 14.6)  # spec §6
    assert (RANDOM_SCORES["Kangaroo"], HUMAN_SCORES["Kangaroo"]) == (52.0, 3035.0)
    for g in GAMES:
        assert human_normalized_score(g, RANDOM_SCORES[g]) == 0.0
        assert human_normalized_score(g, HUMAN_SCORES[g]) == pytest.approx(1.0)
    assert game_name("MsPacmanNoFrameskip-v4") == "MsPacman" and game_name("ALE/UpNDown-v5") == "UpNDown"
