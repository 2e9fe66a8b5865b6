"""distill: knowledge distillation and preference training with one DeepSpeed setup per model role."""
from distill.cli.api import run
from distill.config.errors import RecipeError
from distill.config.schema import Role
from distill.loop.trainer import RoleTrainer
from distill.runtime.roles import RoleManager, RoleModel
from distill.trainers import (
           DistillTrainer,
           DPOTrainer,
           GRPOTrainer,
           LMTrainer,
           PPOTrainer,
           RewardTrainer,
           load_recipe,
           register_trainer,
)

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "PPOTrainer", "RecipeError", "RewardTrainer", "Role", "RoleManager",
           "RoleModel", "RoleTrainer", "load_recipe", "register_trainer", "run"]
__version__ = "0.1.0"
