"""What ``import qwen2_jax`` gives, as the README's Python API section uses it."""

import subprocess
import sys

import pytest

import qwen2_jax


def test_sharding_and_convert_are_attributes_after_a_plain_import():
    # A fresh interpreter: in this one another test may already have imported the subpackages.
    code = ("import sys, qwen2_jax\n"
            "assert 'qwen2_jax.sharding' not in sys.modules  # loaded on first use, not by the import\n"
            "mesh = qwen2_jax.sharding.make_mesh('data=1')\n"
            "print(dict(mesh.shape), qwen2_jax.convert.convert.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "{'data': 1, 'expert': 1, 'tensor': 1} convert"


def test_an_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'qwen2_jax' has no attribute 'shardin'"):
        qwen2_jax.shardin
