import os
import sys

# Every test runs on XLA:CPU, and so do the processes tests start (they inherit this): with the aot extra's
# libtpu and CUDA plugin installed, jax would otherwise try to open a TPU and a GPU at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# tests import their helpers (hf_reference) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
