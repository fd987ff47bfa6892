"""The error a user can cause before a run starts (bad model path, missing file, unreachable host).

Its own module so that every builder (`oreal.runtime.build`, `oreal.runtime.tiny_model`) can raise it
without importing the others. Config parse errors are `oreal.runtime.config.ConfigError`.
"""


class SetupError(RuntimeError):
    """A run cannot start; the message names the input (option, file, host) and what to do."""
