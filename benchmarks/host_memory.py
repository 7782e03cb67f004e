"""Resident memory per host-ready adapter against its file: the host tier at the file's precision.

    python benchmarks/host_memory.py --onnx-dir bench_out/int4_2 --adapters-dir bench_out/compare/processed \
        --count 16 --json benchmarks/results/DATE-host-memory.json

In a fresh child process (so nothing else is resident): an engine with one slot and ``--count``
host-ready places, then each processed adapter registered and read into the host cache (``prefetch``:
no slot), resident memory (VmRSS) read after each. Reported: MB per adapter (the slope over the
adapters) against the mean processed file size, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from edgelora.formats import contract

CHILD = """
import json, re, sys
from pathlib import Path
from edgelora.runtime.config import EngineConfig
from edgelora.runtime.engine import Engine
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
onnx_dir, paths = sys.argv[1], json.loads(sys.argv[2])
engine = Engine(Path(onnx_dir), EngineConfig(max_loras=1, max_cpu_loras=len(paths), num_threads=1))
steps = [rss()]
for index, path in enumerate(paths):
    engine.adapters.add(f"m{index}", Path(path))
    engine.adapters.prefetch(f"m{index}")
    steps.append(rss())
print(json.dumps({"rss": steps, "host_bytes": engine.adapters.host_bytes}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True, help="an export with lora_model.onnx")
    parser.add_argument("--adapters-dir", type=Path, required=True, help="a folder of processed adapter folders")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    folders = sorted(f for f in args.adapters_dir.iterdir() if (f / contract.PROCESSED_ADAPTER).is_file())
    if len(folders) < args.count or args.count < 1:
        print(f"host_memory: error: {args.adapters_dir} has {len(folders)} processed adapters, --count {args.count}",
              file=sys.stderr)
        return 2
    folders = folders[:args.count]
    done = subprocess.run([sys.executable, "-c", CHILD, str(args.onnx_dir), json.dumps([str(f) for f in folders])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"host_memory: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    rss = measured["rss"]
    files = [(f / contract.PROCESSED_ADAPTER).stat().st_size for f in folders]
    per_adapter = (rss[-1] - rss[0]) / args.count
    result = {"onnx_dir": str(args.onnx_dir), "count": args.count, "rss_mb": [r / 2**20 for r in rss],
              "per_adapter_mb": per_adapter / 2**20, "file_mb": statistics.mean(files) / 2**20,
              "host_copy_mb": measured["host_bytes"] / args.count / 2**20,
              "ratio_rss_to_file": per_adapter / statistics.mean(files)}
    print(f"{args.count} host-ready adapters: {result['per_adapter_mb']:.1f} MB resident each (host copy "
          f"{result['host_copy_mb']:.1f} MB), file {result['file_mb']:.1f} MB: {result['ratio_rss_to_file']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
