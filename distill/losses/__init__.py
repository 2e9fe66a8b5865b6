"""Losses as pure functions, registered by name: KD (dense, sparse, chunked), preference, reward, policy gradient."""

from distill.losses.chunked import chunked_kd_loss
from distill.losses.kd import (
    IGNORE_INDEX,
    KD_LOSSES,
    UnknownKDLossError,
    count_valid,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    get_kd_loss,
    kd_loss,
    register_kd_loss,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from distill.losses.preference import (
    PREFERENCE_LOSSES,
    get_preference_loss,
    preference_loss,
    register_preference_loss,
    rewards,
)
from distill.losses.reward import REWARD_LOSSES, centering, get_reward_loss, register_reward_loss
from distill.losses.sparse_kd import (
    SPARSE_KD_LOSSES,
    SparseTeacher,
    chunked_sparse_kd_loss,
    get_sparse_kd_loss,
    register_sparse_kd_loss,
    sparse_kd_loss,
)

__all__ = [
    "REWARD_LOSSES",
    "centering",
    "get_reward_loss",
    "register_reward_loss",
    "PREFERENCE_LOSSES",
    "get_preference_loss",
    "preference_loss",
    "register_preference_loss",
    "rewards",
    "IGNORE_INDEX",
    "KD_LOSSES",
    "SPARSE_KD_LOSSES",
    "SparseTeacher",
    "UnknownKDLossError",
    "chunked_kd_loss",
    "chunked_sparse_kd_loss",
    "count_valid",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "get_kd_loss",
    "get_sparse_kd_loss",
    "kd_loss",
    "register_kd_loss",
    "register_sparse_kd_loss",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_kd_loss",
    "tvd",
]
