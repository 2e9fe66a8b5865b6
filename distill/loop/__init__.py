"""RoleTrainer, the one training loop: preflight, role building, optimizers, checkpoints, run directory, metrics."""
