"""Atari plumbing for the Atari-100k protocol (Kaiser et al. 2019; as used by DER and SPR).

`make_env` builds the training or evaluation env from gymnasium's own wrappers:
  {Game}NoFrameskip-v4 (ale-py: frameskip 1, sticky actions 0, minimal action set, 108k-frame cap)
  -> AtariPreprocessing(noop_max=30, frame_skip=4 with 2-frame max-pool, 84x84 gray,
     terminal_on_life_loss=False)  # its True setting would restart the whole game on the next reset
  -> RecordEpisodeStatistics        # raw (unclipped) return of the whole game in info["episode"]
  -> LifeLossDone                   # training only: life loss = done for bootstrapping, game goes on
  -> FrameStackObservation(4, padding_type="zero")  # SPR/rlpyt zero-pad the stack after every done
Rewards are left raw; the learner clips them. The score tables are the ones SPR normalises with
(mila-iqia/spr src/rlpyt_utils.py, the standard DQN-era random / human numbers).
"""

import re

import ale_py
import gymnasium as gym
from gymnasium.wrappers import (
    AtariPreprocessing,
    FrameStackObservation,
    RecordEpisodeStatistics,
)

gym.register_envs(ale_py)

GAMES = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)  # fmt: skip
RANDOM_SCORES = dict(zip(GAMES, (
    227.8, 5.8, 222.4, 210.0, 14.2, 2360.0, 0.1, 1.7, 811.0, 10780.5, 152.1, 0.0, 65.2, 257.6,
    1027.0, 29.0, 52.0, 1598.0, 258.5, 307.3, -20.7, 24.9, 163.9, 11.5, 68.4, 533.4)))  # fmt: skip
HUMAN_SCORES = dict(zip(GAMES, (
    7127.7, 1719.5, 742.0, 8503.3, 753.1, 37187.5, 12.1, 30.5, 7387.8, 35829.4, 1971.0, 29.6,
    4334.7, 2412.5, 30826.4, 302.8, 3035.0, 2665.5, 22736.3, 6951.6, 14.6, 69571.3, 13455.0,
    7845.0, 42054.7, 11693.2)))  # fmt: skip


def game_name(env_id: str) -> str:
    """'BreakoutNoFrameskip-v4' or 'ALE/Breakout-v5' -> 'Breakout'."""
    return re.sub(r"(NoFrameskip)?-v\d+$", "", env_id.split("/")[-1])


def human_normalized_score(game: str, score: float) -> float:
    """HNS = (score - random) / (human - random)."""
    return (score - RANDOM_SCORES[game]) / (HUMAN_SCORES[game] - RANDOM_SCORES[game])


class LifeLossDone(gym.Wrapper):
    """Life loss ends the *training* episode without restarting the game (spec §6; rlpyt's
    `episodic_lives`, CleanRL's EpisodicLifeEnv). `step` returns terminated=True and
    info["life_loss"]=True; the reset() that follows only hands back the current frame (so the
    frame stack above restarts zero-padded, as in SPR) unless the game is really over. Unlike
    EpisodicLifeEnv no extra no-op step is taken, so every agent step is exactly 4 frames."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives, self.game_over, self.last = 0, True, None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        info["life_loss"] = info["lives"] < self.lives
        self.lives = info["lives"]
        self.last = (obs, dict(info))
        return obs, reward, terminated or info["life_loss"], truncated, info

    def reset(self, **kwargs):
        if not self.game_over:  # a life was lost: continue the same game
            return self.last
        obs, info = self.env.reset(**kwargs)
        self.lives, self.game_over = info["lives"], False
        return obs, info


def make_env(env_id: str, seed: int, train: bool = True, max_episode_frames: int = 108_000,
             noop_max: int = 30) -> gym.Env:
    """Atari-100k env: obs (4, 84, 84) uint8, raw rewards, life loss = done only if `train`."""
    env = gym.make(env_id, max_num_frames_per_episode=max_episode_frames,
                   repeat_action_probability=0.0, frameskip=1)
    env = AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84,
                             grayscale_obs=True, terminal_on_life_loss=False)
    env = RecordEpisodeStatistics(env)
    if train:
        env = LifeLossDone(env)
    env = FrameStackObservation(env, 4, padding_type="zero")
    env.action_space.seed(seed)
    return env
