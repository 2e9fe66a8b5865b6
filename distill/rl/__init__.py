"""Shared by every RL trainer: reward functions, reward-model scoring, the rows of a rollout batch."""
