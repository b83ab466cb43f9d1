"""Multi-host: two JAX processes on localhost (CPU, 4 devices each, gloo collectives) restore one Orbax
checkpoint onto a global 8-device mesh and compute what one process with 8 devices computes.

``scripts/multihost.sh`` runs the three processes (each under ``timeout``) and compares them itself; this
test runs it, bounded in time, and checks the results it leaves behind.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "multihost.sh")


def test_two_processes_restore_and_generate_exactly_what_one_8_device_process_does(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(["bash", SCRIPT, "--workdir", str(tmp_path), "--mesh", "data=2,expert=2,tensor=2",
                           "--timeout", "300"], capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, f"multihost.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "over 8 cpu devices (2 processes)" in proc.stdout

    single, *processes = (np.load(tmp_path / f"{name}.npz") for name in ("single", "process0", "process1"))
    scale = np.abs(single["logits"]).max()
    for p in processes:
        np.testing.assert_array_equal(p["tokens"], single["tokens"])
        np.testing.assert_allclose(p["logits"], single["logits"], rtol=0, atol=1e-5 * scale)
    # Each process holds the parameter blocks of its own 4 devices only (-1: another process's device), the
    # same bytes per mesh position as the single process.
    own = [p["device_bytes"] >= 0 for p in processes]
    assert [int(o.sum()) for o in own] == [4, 4] and not (own[0] & own[1]).any()
    merged = np.where(own[0], processes[0]["device_bytes"], processes[1]["device_bytes"])
    np.testing.assert_array_equal(merged, single["device_bytes"])
