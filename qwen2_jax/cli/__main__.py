"""``python -m qwen2_jax.cli``: the ``qwen2-jax`` command."""

import sys

from qwen2_jax.cli import main

sys.exit(main())
