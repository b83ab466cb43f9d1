"""The project's error types: what the user got wrong, said in one line that names the flag, field, file or
tensor and the value expected.

``qwen2-jax`` prints these (and the OS errors about the user's paths) as one line and exits with status 2; any
other exception is a bug and keeps its traceback (``QWEN2_JAX_DEBUG=1`` shows the traceback of these too).
They subclass ``ValueError``, which is what the project raised before they existed.

- ``InputError``: a bad argument or flag value (here).
- ``ConfigError`` (``qwen2_jax.model.config``): a config.json this port cannot run exactly.
- ``CheckpointError`` (``qwen2_jax.model.hf_files``): a checkpoint that cannot be loaded.
- ``ConvertError`` (``qwen2_jax.convert``): a conversion that cannot write its output.
- ``AotError`` (``qwen2_jax.tools.aot``): a target or step ``qwen2-jax aot`` cannot compile.
"""


class Qwen2JaxError(ValueError):
    """Bad input, found by the project's own checks; the message is one line."""


class InputError(Qwen2JaxError):
    """A bad argument or flag value; the message names it, the value given and the value expected."""
