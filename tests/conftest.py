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


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session (a worker's), in a temporary directory, never the user's
    home: the tiny models' programs recur across test files, and the CLI run in-process and the processes tests
    start (servers, scripts) find it through QWEN2_JAX_CACHE_DIR."""
    from qwen2_jax import cli

    os.environ["QWEN2_JAX_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax-cache")
    cli.enable_compilation_cache()


@pytest.fixture(autouse=True)
def without_compilation_cache(request):
    """Tests marked ``no_compilation_cache`` compile for a device this machine lacks (an executable JAX cannot
    load back from the cache), or count XLA compilations (which a cache hit would hide)."""
    if request.node.get_closest_marker("no_compilation_cache") is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    cc.reset_cache()
