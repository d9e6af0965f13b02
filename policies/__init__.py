"""Policies for loopsim envs (the ``Policy`` protocol, experts, SB3 and behaviour cloning; to come)."""
