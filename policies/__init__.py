"""loopsim's policies: one :class:`Policy` protocol, scripted experts, random, SB3 and behaviour cloning.

Every policy acts with SB3's ``predict(observation, deterministic=...) -> (action, state)`` on one
observation or a batch, and saves to a portable checkpoint directory (JSON + safetensors) that
:func:`load_policy` rebuilds in any process without unpickling anything.
"""

from loopsim.policies.base import POLICY_KINDS, BasePolicy, Policy, load_policy, register_policy
from loopsim.policies.bc import BCPolicy
from loopsim.policies.checkpoint import CheckpointError, is_checkpoint, read_checkpoint, write_checkpoint
from loopsim.policies.sb3 import SB3Policy
from loopsim.policies.scripted import ExpertPolicy, RandomPolicy

__all__ = [
    "POLICY_KINDS",
    "BCPolicy",
    "BasePolicy",
    "CheckpointError",
    "ExpertPolicy",
    "Policy",
    "RandomPolicy",
    "SB3Policy",
    "is_checkpoint",
    "load_policy",
    "read_checkpoint",
    "register_policy",
    "write_checkpoint",
]
