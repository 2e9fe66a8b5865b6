"""distill: knowledge distillation and preference training with one DeepSpeed setup per model role."""
from distill.errors import RecipeError
from distill.recipe import Role
from distill.roles import RoleManager, RoleModel
from distill.trainer import RoleTrainer
from distill.trainers import DistillTrainer, DPOTrainer, GRPOTrainer, LMTrainer, PPOTrainer, RewardTrainer, load_recipe, register_trainer
from distill.api import run

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "PPOTrainer", "RecipeError", "RewardTrainer", "Role", "RoleManager",
           "RoleModel", "RoleTrainer", "load_recipe", "register_trainer", "run"]
__version__ = "0.1.0"
