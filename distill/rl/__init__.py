"""Shared by every RL trainer: rollout batches, their prompt records, reward functions and reward-model scores."""
