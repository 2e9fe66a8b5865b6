"""distill: knowledge distillation and preference training with one DeepSpeed setup per model role."""
from distill.recipe import RecipeError, Role
from distill.roles import RoleManager, RoleModel
from distill.trainer import RoleTrainer
from distill.trainers import register_trainer
from distill.trainers.grpo import GRPOTrainer

__all__ = ["GRPOTrainer", "RecipeError", "Role", "RoleManager", "RoleModel", "RoleTrainer", "register_trainer"]
__version__ = "0.1.0"
