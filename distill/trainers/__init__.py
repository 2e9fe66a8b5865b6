"""The algorithms, each a RoleTrainer with its roles, declared recipe and loss step, registered by name; the teacher-cache writer."""
from __future__ import annotations

from distill.loop.registry import TRAINERS, get_trainer, register_trainer, trainer_name
from distill.loop.trainer import load_recipe
from distill.trainers.distill import DistillTrainer
from distill.trainers.dpo import DPOTrainer
from distill.trainers.grpo import GRPOTrainer
from distill.trainers.lm import LMTrainer
from distill.trainers.ppo import PPOTrainer
from distill.trainers.reward import RewardTrainer

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "PPOTrainer", "RewardTrainer", "TRAINERS", "get_trainer", "load_recipe", "register_trainer", "trainer_name"]
