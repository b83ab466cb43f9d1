"""Converter benchmark: peak memory must not grow with model size; throughput in GB/s.

Writes two synthetic HF checkpoints with the structure of the quarter-scale config
(/work/shared/configs/qwen2-57b-a14b-quarter.json) and different numbers of layers (float32 by default:
1 layer = 1.6 GB, 11 layers = 6.6 GB), converts each in a fresh subprocess, and prints source size, time,
GB/s, CPU seconds and the subprocess's peak RSS (``ru_maxrss``). Checks the issue's bound: the larger is >= 4 GB and
>= 4x the smaller, and its peak RSS is <= 1.3x the smaller's and <= 2 GB (exit status 1 if not).
The synthetic files are deleted afterwards (peak disk use: about twice the larger checkpoint).

    .venv/bin/python scripts/bench_convert.py [--layers 1 11] [--dtype float32] [--workdir /tmp] [--compression]
    .venv/bin/python scripts/bench_convert.py --tiny  # a few-MB config: that the script runs (CI), no bounds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

DEFAULT_CONFIG = "qwen2_jax/configs/qwen2-57b-a14b-quarter.json"


def child(src: str, out: str, compression: bool) -> None:
    """Runs in the measured subprocess: one conversion, then its own peak RSS."""
    from qwen2_jax.convert import convert, orbax_io

    orbax_io.USE_COMPRESSION = compression
    meta = convert(src, out, progress=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    params = os.path.join(out, "params")
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(params) for f in files)
    print(json.dumps({"seconds": meta["seconds"], "bytes": meta["source"]["bytes"],
                      "files": len(meta["source"]["files"]), "dtype": meta["dtype"],
                      "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
                      "stored_bytes": stored}))


def baseline() -> None:
    """The RSS floor: the converter's imports and JAX's CPU client, converting nothing."""
    import jax

    import qwen2_jax.convert  # noqa: F401

    jax.devices()
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"conversion subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--layers", type=int, nargs=2, default=(1, 11), metavar=("SMALL", "LARGE"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--shard-gb", type=float, default=2.0, help="safetensors file size, as HF shards them")
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: $TMPDIR)")
    parser.add_argument("--compression", action="store_true", help="write the Orbax arrays zstd-compressed")
    parser.add_argument("--tiny", action="store_true",
                        help="qwen2-jax bench's few-MB config at 1 and 4 layers; the bounds, which are about "
                             "gigabytes, are reported but do not set the exit status")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.compression)
        return 0
    if args.baseline:
        baseline()
        return 0

    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.convert import write_hf_checkpoint

    if args.tiny:
        from qwen2_jax.tools.bench import bench_config

        base_cfg, args.config, args.layers = bench_config("tiny"), "tiny", (1, 4)
    else:
        base_cfg = Qwen2MoeConfig.from_json(args.config)
    work = tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir)
    load = os.getloadavg()  # other work on the machine slows the I/O-bound conversion; say how much
    rows = []
    try:
        floor = measure(["--baseline"])["peak_rss"]
        for layers in args.layers:
            cfg = base_cfg.replace(num_hidden_layers=layers)
            src, out = os.path.join(work, f"hf-{layers}"), os.path.join(work, f"orbax-{layers}")
            t = time.perf_counter()
            write_hf_checkpoint(cfg, src, dtype=args.dtype, max_shard_bytes=int(args.shard_gb * 1e9))
            written = time.perf_counter() - t
            r = measure(["--child", src, out] + ["--compression"] * args.compression)
            r.update(layers=layers, write_seconds=written)
            rows.append(r)
            shutil.rmtree(src)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"config {args.config} ({args.dtype}{', zstd' if args.compression else ''}), {os.cpu_count()} CPUs; "
          f"RSS floor (imports + JAX client) {floor / 2**20:.0f} MiB")
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"{'layers':>6} {'files':>5} {'source GB':>9} {'stored GB':>9} {'convert s':>9} {'GB/s':>6} {'CPU s':>6} "
          f"{'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['layers']:>6} {r['files']:>5} {r['bytes'] / 1e9:>9.2f} {r['stored_bytes'] / 1e9:>9.2f} "
              f"{r['seconds']:>9.1f} {r['bytes'] / 1e9 / r['seconds']:>6.2f} {r['cpu_seconds']:>6.1f} "
              f"{r['peak_rss'] / 2**20:>12.0f}")
    small, large = sorted(rows, key=lambda r: r["bytes"])
    size_ratio, rss_ratio = large["bytes"] / small["bytes"], large["peak_rss"] / small["peak_rss"]
    print(f"size ratio {size_ratio:.2f}x, peak RSS ratio {rss_ratio:.3f}x")
    checks = {
        "larger checkpoint >= 4 GB": large["bytes"] >= 4e9,
        "sizes differ >= 4x": size_ratio >= 4,
        "peak RSS of the larger <= 1.3x the smaller": rss_ratio <= 1.3,
        "peak RSS of the larger <= 2 GB": large["peak_rss"] <= 2e9,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.tiny:
        print("tiny mode: the bounds are about multi-GB checkpoints; not enforced")
    return 0 if all(checks.values()) or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
