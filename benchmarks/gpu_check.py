"""The native CUDA adapter pool, checked for real on a GPU machine (one script, one results file).

    python benchmarks/gpu_check.py --prepare                                                   # here: pybind11 to carry
    python benchmarks/gpu_check.py --json benchmarks/results/DATE-gpu-check.json              # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --json /tmp/gpu-check-cpu.json                 # the same checks, host pool

With ``--device cuda`` (the default) it builds ``edgelora._runtime`` with ``EDGELORA_CUDA=ON`` against this
machine's nvcc and Python (CMake into ``--build-dir``; pybind11 from the installed package or
``--pybind11-dir``), loads that build, and checks the device pool by reading device memory with CuPy
(or PyTorch): slot writes of mixed ranks equal a host pool's bytes; ``move``, rank-capacity growth and
``clear``; the pointers a step binds (``a_pointer`` / ``b_pointer`` over slots first..last) address
those slots' rows; a LoRA product computed on the GPU from the bound slots (PyTorch matmul over the
device memory) equals the same product on the CPU for a mixed batch (each row its slot); and the copy
bandwidth into slots. Every result goes into ``--json``.

With ``--device cpu`` every check runs against the installed module's host pool, reading memory by
address with ctypes and computing with numpy: the script's own logic is tested on any machine.
Without nvcc, CuPy/PyTorch or a GPU, ``--device cuda`` records ``"status": "skipped"`` with why and
exits 0 (``--require-gpu``: exits 2 instead).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.machinery
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SITES = [(64, 48), (32, 96), (128, 128)]  # (in, out) of three LoRA sites
SLOTS, MAX_RANK = 4, 16
CARRIED_PYBIND11 = ROOT / "build" / "gpu-deps" / "pybind11"  # the GPU machine reaches no package registry
BANDWIDTH_SITES = [(896, 896)] * 48 + [(896, 4864)] * 24  # a rank-16 adapter about the bench model's size


class Skip(Exception):
    """The machine cannot run the CUDA checks: why."""


# -- reading memory by address -----------------------------------------------------------------------
class HostReader:
    name = "host (ctypes)"

    def read(self, address: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer((ctypes.c_uint8 * count).from_address(address), dtype).reshape(shape).copy()

    def lora_delta(self, x: np.ndarray, a_address: int, b_address: int, rank: int, in_f: int, out_f: int):
        a = self.read(a_address, (rank, in_f))
        b = self.read(b_address, (rank, out_f))
        return (x @ a.T) @ b

    def synchronize(self) -> None:
        pass


class CudaReader:
    """Device memory through CuPy (UnownedMemory at the address), products with PyTorch when it is there."""

    def __init__(self):
        try:
            import cupy
        except ImportError as exc:
            raise Skip("CuPy is not installed (it reads the pool's device memory)") from exc
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise Skip("no CUDA device")
        self.cupy = cupy
        self.name = f"cuda (cupy {cupy.__version__}, {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()})"

    def device_array(self, address: int, shape: tuple[int, ...], dtype=np.float32):
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        memory = self.cupy.cuda.UnownedMemory(address, count, owner=None)
        return self.cupy.ndarray(shape, dtype, self.cupy.cuda.MemoryPointer(memory, 0))

    def read(self, address: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return self.device_array(address, shape, dtype).get()

    def lora_delta(self, x: np.ndarray, a_address: int, b_address: int, rank: int, in_f: int, out_f: int):
        a = self.device_array(a_address, (rank, in_f))
        b = self.device_array(b_address, (rank, out_f))
        try:
            import torch

            a_t, b_t = torch.from_dlpack(a), torch.from_dlpack(b)
            x_t = torch.as_tensor(x, device=a_t.device)
            return ((x_t @ a_t.T) @ b_t).cpu().numpy()
        except ImportError:
            return ((self.cupy.asarray(x) @ a.T) @ b).get()

    def synchronize(self) -> None:
        self.cupy.cuda.runtime.deviceSynchronize()


# -- the module under test ------------------------------------------------------------------------------
def build_cuda_module(build_dir: Path, pybind11_dir: Path | None) -> Path:
    """CMake with EDGELORA_CUDA=ON against this Python and nvcc; the built extension's path."""
    if shutil.which("nvcc") is None:
        raise Skip("nvcc is not on PATH")
    if shutil.which("cmake") is None:
        raise Skip("cmake is not on PATH")
    if pybind11_dir is None:
        try:
            import pybind11

            pybind11_dir = Path(pybind11.get_cmake_dir())
        except ImportError:
            pybind11_dir = CARRIED_PYBIND11 / "share" / "cmake" / "pybind11"  # --prepare put it there
            if not pybind11_dir.is_dir():
                raise Skip("pybind11 is not installed here: run with --prepare on a machine that has it and carry "
                           f"{CARRIED_PYBIND11.relative_to(ROOT)}, or give --pybind11-dir") from None
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, "-DEDGELORA_CUDA=ON",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11_dir}"]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j"], check=True)
    built = sorted(build_dir.glob("_runtime*.so")) + sorted(build_dir.glob("**/_runtime*.so"))
    if not built:
        raise RuntimeError(f"{build_dir}: the build made no _runtime*.so")
    return built[0]


def load_module(path: Path):
    loader = importlib.machinery.ExtensionFileLoader("_runtime", str(path))
    spec = importlib.util.spec_from_loader("_runtime", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# -- the checks ----------------------------------------------------------------------------------------
def ready(rng, rank: int, sites=SITES) -> tuple[list, list]:
    return ([rng.standard_normal((rank, i)).astype(np.float32) for i, _ in sites],
            [rng.standard_normal((rank, o)).astype(np.float32) for _, o in sites])


def slot_rows(pool, reader, site: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """What slot ``slot`` holds for ``site``: A^T [capacity, in] and B [capacity, out], read by address."""
    in_f, out_f = SITES[site]
    capacity = pool.rank_capacity
    return (reader.read(pool.a_pointer(site, slot, slot), (capacity, in_f)),
            reader.read(pool.b_pointer(site, slot, slot), (capacity, out_f)))


def padded(array: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros((capacity, array.shape[1]), array.dtype)
    out[:array.shape[0]] = array
    return out


def run_checks(module, device: str, reader) -> dict:
    rng = np.random.default_rng(0)
    results: dict = {}

    def check(name: str, ok: bool, detail: str = "") -> None:
        results[name] = {"ok": bool(ok), **({"detail": detail} if detail else {})}

    pool = module.AdapterPool(SITES, SLOTS, MAX_RANK, "float32", device)
    host = module.AdapterPool(SITES, SLOTS, MAX_RANK, "float32", "cpu")
    host_reader = HostReader()
    adapters = {1: ready(rng, 4), 2: ready(rng, 16), 3: ready(rng, 8)}
    for slot, (a, b) in adapters.items():  # ranks 4, then 16 (the capacity grows), then 8
        pool.write(slot, a[0].shape[0], a, b)
        host.write(slot, a[0].shape[0], a, b)
    reader.synchronize()
    check("capacity_grew_to_the_largest_rank", pool.rank_capacity == 16 and pool.generation >= 1,
          f"capacity {pool.rank_capacity}, generation {pool.generation}")
    same = all(np.array_equal(slot_rows(pool, reader, site, slot)[k], slot_rows(host, host_reader, site, slot)[k])
               for site in range(len(SITES)) for slot in (1, 2, 3) for k in (0, 1))
    check("mixed_rank_writes_equal_the_host_pool", same)
    exact = all(np.array_equal(slot_rows(pool, reader, site, slot)[0], padded(a[site], pool.rank_capacity))
                and np.array_equal(slot_rows(pool, reader, site, slot)[1], padded(b[site], pool.rank_capacity))
                for slot, (a, b) in adapters.items() for site in range(len(SITES)))
    check("slots_hold_their_adapter_padded_with_zeros_after_growth", exact)
    capacity = pool.rank_capacity
    block_ok = True
    for site, (in_f, out_f) in enumerate(SITES):  # the pointers a step binds: slots 1..3 as one block
        block_a = reader.read(pool.a_pointer(site, 1, 3), (3 * capacity, in_f))
        block_b = reader.read(pool.b_pointer(site, 1, 3), (3 * capacity, out_f))
        want_a = np.concatenate([padded(adapters[slot][0][site], capacity) for slot in (1, 2, 3)])
        want_b = np.concatenate([padded(adapters[slot][1][site], capacity) for slot in (1, 2, 3)])
        block_ok &= np.array_equal(block_a, want_a) and np.array_equal(block_b, want_b)
        block_ok &= pool.a_pointer(site, 2, 3) == pool.a_pointer(site, 1, 3) + capacity * in_f * 4
    check("bound_pointers_address_their_slots", block_ok)
    x = rng.standard_normal((6, SITES[2][0])).astype(np.float32)
    row_slots = [1, 2, 3, 2, 1, 3]  # a mixed batch: each row its own adapter
    gpu = np.stack([reader.lora_delta(x[row:row + 1], pool.a_pointer(2, slot, slot), pool.b_pointer(2, slot, slot),
                                      capacity, *SITES[2])[0] for row, slot in enumerate(row_slots)])
    cpu = np.stack([(x[row] @ adapters[slot][0][2].T) @ adapters[slot][1][2] for row, slot in enumerate(row_slots)])
    error = float(np.abs(gpu - cpu).max())
    check("lora_product_from_bound_slots_equals_the_cpu", error < 1e-3 * max(1.0, float(np.abs(cpu).max())),
          f"max abs difference {error:.2e}")
    pool.move(3, 1)
    reader.synchronize()
    moved = all(np.array_equal(slot_rows(pool, reader, site, 1)[0], padded(adapters[3][0][site], capacity))
                for site in range(len(SITES)))
    emptied = all(not slot_rows(pool, reader, site, 3)[k].any() for site in range(len(SITES)) for k in (0, 1))
    check("move_copies_then_clears_the_source", moved and emptied and pool.slot_rank(1) == 8 and pool.slot_rank(3) == 0)
    pool.clear(2)
    reader.synchronize()
    check("clear_zeroes_the_slot", all(not slot_rows(pool, reader, site, 2)[k].any()
                                       for site in range(len(SITES)) for k in (0, 1)) and pool.slot_rank(2) == 0)
    big = module.AdapterPool(BANDWIDTH_SITES, 2, 16, "float32", device)
    a, b = ready(rng, 16, BANDWIDTH_SITES)
    size = sum(array.nbytes for array in a + b)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        big.write(1, 16, a, b)
        reader.synchronize()
        times.append(time.perf_counter() - started)
    results["copy_into_slot"] = {"ok": True, "bytes": size, "median_s": float(np.median(times)),
                                 "gb_per_s": round(size / float(np.median(times)) / 1e9, 2)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: build with EDGELORA_CUDA=ON and check the device pool; cpu: the installed host pool")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "gpu-check", help="CMake build folder")
    parser.add_argument("--pybind11-dir", type=Path, default=None, help="pybind11's CMake folder, if not installed")
    parser.add_argument("--module", type=Path, default=None, help="an already built _runtime*.so (skips the build)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 instead of recording a skip")
    parser.add_argument("--prepare", action="store_true",
                        help="copy this machine's pybind11 to build/gpu-deps (carry it to a GPU machine) and stop")
    parser.add_argument("--json", type=Path, default=None, help="where the results go (required unless --prepare)")
    args = parser.parse_args(argv)
    if args.prepare:
        try:
            import pybind11
        except ImportError:
            print("--prepare copies the installed pybind11: pip install pybind11 first", file=sys.stderr)
            return 2

        shutil.rmtree(CARRIED_PYBIND11, ignore_errors=True)
        shutil.copytree(Path(pybind11.__file__).parent, CARRIED_PYBIND11)
        print(f"pybind11 {pybind11.__version__} -> {CARRIED_PYBIND11}")
        return 0
    if args.json is None:
        parser.error("--json is required")
    report: dict = {"device": args.device, "python": platform.python_version(), "machine": platform.node()}
    try:
        if args.device == "cpu":
            from edgelora import _runtime as module

            reader = HostReader()
        else:
            reader = CudaReader()
            path = args.module or build_cuda_module(args.build_dir, args.pybind11_dir)
            module = load_module(path)
            if not module.with_cuda:
                raise RuntimeError(f"{path}: built without CUDA")
            report["module"] = str(path)
        report["reader"] = reader.name
        report["checks"] = run_checks(module, args.device, reader)
        report["status"] = "passed" if all(c["ok"] for c in report["checks"].values()) else "failed"
    except Skip as exc:
        report.update(status="skipped", why=str(exc))
    except (subprocess.CalledProcessError, RuntimeError, ValueError) as exc:
        report.update(status="failed", why=f"{type(exc).__name__}: {exc}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if report["status"] == "skipped":
        return 2 if args.require_gpu else 0
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
