"""The JAX port against transformers on the same weights: ``qwen2-jax bench`` (see qwen2_jax/bench.py and
docs/performance.md), runnable from a checkout without installing it.

    python scripts/bench.py [--config qwen2-57b-a14b-quarter] [--batches 1,8] [--rounds 2] [--json F] [--plot F]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
