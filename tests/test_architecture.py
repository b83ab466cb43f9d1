"""The package's layers (docs/architecture.md): imports only go down, no cycles, modules and classes stay small,
``import qwen2_jax`` is light, the model and inference path imports nothing above it, and the old module paths
of ``qwen2_jax.MOVED`` are the new modules. The import graph comes from scripts/architecture.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import qwen2_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("architecture", os.path.join(REPO, "scripts", "architecture.py"))
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)


def python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet), run from the checkout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def graph():
    mods = arch.modules()
    return mods, arch.imports(mods)


def test_the_checker_reads_the_whole_package_and_its_imports(graph):
    mods, edges = graph
    # Every subpackage is read, from all three root directories, and relative and in-function imports count.
    for name in ("qwen2_jax", "qwen2_jax.errors", "qwen2_jax.model.modeling", "qwen2_jax.inference.generate",
                 "qwen2_jax.convert.converter", "qwen2_jax.sharding.rules", "qwen2_jax.tools.aot", "qwen2_jax.cli"):
        assert name in mods
    pairs = {(src, dst) for src, dst, *_ in edges}
    assert ("qwen2_jax.model.modeling", "qwen2_jax.model.attention") in pairs   # from .attention import ...
    assert ("qwen2_jax.loading", "qwen2_jax.model.modeling") in pairs
    assert ("qwen2_jax.convert.converter", "qwen2_jax.convert.orbax_io") in pairs  # from . import orbax_io
    assert all(arch.layer_of(m) is not None for m in mods)


def test_the_checker_sees_an_upward_import_a_sibling_import_and_a_cycle():
    assert arch.crosses("qwen2_jax.model.moe", "qwen2_jax.inference.generate")
    assert arch.crosses("qwen2_jax.inference.serving.server", "qwen2_jax.cli.generate")
    assert arch.crosses("qwen2_jax.training.step", "qwen2_jax.inference.sampling")
    assert arch.crosses("qwen2_jax.sharding.rules", "qwen2_jax.convert.layout")
    assert not arch.crosses("qwen2_jax.tools.aot", "qwen2_jax.model.moe")
    assert not arch.crosses("qwen2_jax.convert.converter", "qwen2_jax")  # __version__, the errors
    edges = [("a", "b", 1, "", ""), ("b", "c", 1, "", ""), ("c", "a", 1, "", ""), ("c", "d", 1, "", "")]
    assert arch.cycles(edges) == [["a", "b", "c"]]


def test_every_import_goes_down_the_layers(graph):
    """Only to the own layer or below, never to the sibling (inference/training, sharding/convert), never through
    an old path, and the facade's names (from_pretrained, ...) only in tools and cli."""
    mods, edges = graph
    assert arch.layer_violations(mods, edges) == []


def test_no_import_cycles(graph):
    _, edges = graph
    assert arch.cycles(edges) == []


def test_modules_and_classes_stay_small(graph):
    mods, _ = graph
    assert arch.size_violations(mods) == []


def test_check_exits_1_with_the_violations_and_0_without():
    proc = subprocess.run([sys.executable, "scripts/architecture.py", "--check"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    found = arch.check()
    assert proc.returncode == (1 if found else 0), proc.stderr
    assert proc.stdout.splitlines() == (found or ["no violations"])


def test_import_qwen2_jax_imports_no_jax():
    python("import qwen2_jax, sys\n"
           "assert 'jax' not in sys.modules, 'import qwen2_jax started jax'\n"
           "assert qwen2_jax.__version__ and qwen2_jax.InputError\n"
           "assert 'jax' not in sys.modules\n")


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from qwen2_jax.convert import write_hf_checkpoint
    from qwen2_jax.model.config import Qwen2MoeConfig

    path = tmp_path_factory.mktemp("tiny-hf")
    write_hf_checkpoint(Qwen2MoeConfig(**TINY), path)
    return str(path)


def test_from_pretrained_and_generate_import_only_the_model_and_inference_path(tiny_checkpoint):
    out = python(
        "import sys, qwen2_jax\n"
        f"model = qwen2_jax.from_pretrained({tiny_checkpoint!r})\n"
        "tokens = qwen2_jax.generate(model, [[1, 2, 3]], max_new_tokens=2)\n"
        "assert len(tokens[0]) == 2, tokens\n"
        "above = ('qwen2_jax.tools', 'qwen2_jax.inference.serving', 'qwen2_jax.training', 'qwen2_jax.cli')\n"
        "print([m for m in sys.modules if m.startswith(above) or m.split('.')[0] in ('torch', 'fastapi', "
        "'matplotlib')])\n")
    assert out.stdout.splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def moved():
    """Each old path imported once in one fresh interpreter: the module it gave, the new path's, the warnings."""
    code = (
        "import importlib, json, sys, warnings\n"
        "import qwen2_jax\n"
        "out = {}\n"
        "for old, new in qwen2_jax.MOVED.items():\n"
        "    fresh = old not in sys.modules\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    out[old] = dict(fresh=fresh, same=module is importlib.import_module(new), name=module.__name__,\n"
        "                    warned=[str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)\n"
        "                            and old in str(w.message)])\n"
        "print(json.dumps(out))\n")
    return json.loads(python(code).stdout.splitlines()[-1])


@pytest.mark.parametrize("old", sorted(qwen2_jax.MOVED))
def test_an_old_module_path_is_the_new_module_and_warns(moved, old):
    got = moved[old]
    assert got["fresh"], f"{old} was imported before anyone asked for it"
    assert got["same"] and got["name"] == qwen2_jax.MOVED[old]
    assert got["warned"], f"importing {old} gave no DeprecationWarning"
    assert qwen2_jax.MOVED[old] in got["warned"][0]


def test_draw_writes_a_png(tmp_path):
    out = tmp_path / "architecture.png"
    subprocess.run([sys.executable, "scripts/architecture.py", "--draw", str(out), "--tiny"], check=True, cwd=REPO,
                   timeout=300, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
