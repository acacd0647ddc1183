"""The base config lives with the library (``vdit_jax/config.py``); configs start from it."""

from vdit_jax.config import get_base_config  # noqa: F401
