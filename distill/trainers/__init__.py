"""The shipped trainers, registered by name, and `load_recipe`: a recipe to a validated recipe and its trainer."""
from __future__ import annotations

from distill.trainers.distill import DistillTrainer
from distill.trainers.dpo import DPOTrainer
from distill.trainers.grpo import GRPOTrainer
from distill.trainers.lm import LMTrainer
from distill.trainers.ppo import PPOTrainer
from distill.trainers.reward import RewardTrainer
from distill.trainer import TRAINERS, get_trainer, load_recipe, register_trainer, trainer_name

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "PPOTrainer", "RewardTrainer", "TRAINERS", "get_trainer", "load_recipe", "register_trainer", "trainer_name"]
