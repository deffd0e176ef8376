"""Environments: the API (`base`), the contract as a check (`check.check_env`, re-exported
here), the registry (`registry.make`), the built-in environments, tools and wrappers."""

from mtrl_jax.envs.check import EnvContractError, check_env

__all__ = ["EnvContractError", "check_env"]
