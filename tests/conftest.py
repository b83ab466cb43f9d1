import os
import sys

import pytest

# Every test runs on XLA:CPU, and so do the processes tests start (they inherit this): with the aot extra's
# libtpu and CUDA plugin installed, jax would otherwise try to open a TPU and a GPU at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# tests import their helpers (hf_reference) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): a worker per core, but no more than one per 8 GiB of memory,
    which the largest test files (the 40,000-token prompt, the 8-device sharding run) need at their peak."""
    import psutil

    return max(1, min(os.cpu_count() or 1, psutil.virtual_memory().total // 2**33))


@pytest.fixture(autouse=True)
def compilation_cache(tmp_path_factory, monkeypatch):
    """The CLI, run in-process, turns on JAX's persistent compilation cache: keep it out of the user's home, and
    off again after the test, so a later test in the same process (an aot compile for a device this machine
    lacks) neither reads nor writes it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    from qwen2_jax.cli import COMPILATION_CACHE_SETTINGS

    monkeypatch.setenv("QWEN2_JAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    before = {name: getattr(jax.config, name) for name in COMPILATION_CACHE_SETTINGS}
    yield
    if any(getattr(jax.config, name) != value for name, value in before.items()):
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()
