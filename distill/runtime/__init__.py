"""Processes and roles at run time: launch, rank exits, RoleManager/RoleModel, overlap, the DeepSpeed/accelerate patches."""
