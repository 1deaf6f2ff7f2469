#!/usr/bin/env python3
"""Fetch FlashInfer wheels for an offline GPU machine, slimmed to the sampling ops.

The benchmark (`bench_ops.py`) compares our verify kernels with
``flashinfer.sampling.softmax`` + ``flashinfer.sampling.chain_speculative_sampling``.
The device machines (python 3.12, torch 2.11+cu130, CUDA 13 nvcc, ninja) reach no
package index, so the wheels travel in ``.whl/`` (ignored by git) and are installed there
with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl``.

flashinfer-python is a pure-Python wheel that JIT-compiles its CUDA sources with nvcc on
first use; its only import-time needs missing from the device image are ``apache-tvm-ffi``
(the JIT modules' FFI) and nothing else (cutlass-dsl, cuda-tile, nccl4py, cudnn-frontend
are imported lazily by ops we do not call).  The full wheel is ~62 MB, mostly CUDA sources
of other kernels; this script drops the sources the sampling module does not compile
(``data/csrc`` except the sampling files, ``data/cutlass``, ``data/spdlog`` and the
``.cu/.cuh/.h`` files of other JIT modules), keeping every Python file, and rewrites the
wheel's RECORD.  Result: ~22 MB + 3.3 MB for apache-tvm-ffi.

``--curand-headers`` also stores the cuRAND headers (sampling.cuh includes <curand.h>) as a
fallback for an image whose CUDA toolkit and nvidia-curand wheel both lack them (~2 MB,
plain files under .whl/curand_include; downloads the 77 MB nvidia-curand wheel once).

Usage (from the repo root, on a machine that reaches PyPI):
    python3 benchmarks/fetch_flashinfer.py            # -> .whl/
    python3 benchmarks/fetch_flashinfer.py --curand-headers
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

FLASHINFER_VERSION = "0.7.2.post1"
TVM_FFI_VERSION = "0.1.15.post2"  # flashinfer 0.7.2.post1 needs apache-tvm-ffi>=0.1.11,<0.2
CURAND_VERSION = "10.4.5.25"

PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

# Sources compiled by flashinfer.jit.sampling.gen_sampling_module (0.7.x) and what they include
# from data/csrc (found with `ninja -t deps` in the JIT build folder).
SAMPLING_CSRC = {"sampling.cu", "renorm.cu", "flashinfer_sampling_binding.cu"}
DROP_PREFIXES = ("flashinfer/data/cutlass/", "flashinfer/data/spdlog/")
CUDA_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".inl", ".c", ".cpp", ".cc")


def pip_download(spec: str, dest: pathlib.Path, python_version: str) -> pathlib.Path:
    """Download one wheel (no dependencies) for the device's python and platform."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + [spec], check=True)
    new = set(dest.glob("*.whl")) - before
    name = spec.split("=")[0].replace("-", "_").lower()
    found = [p for p in (new or dest.glob("*.whl")) if p.name.lower().startswith(name)]
    if len(found) != 1:
        raise RuntimeError(f"expected one wheel for {spec} in {dest}, got {found}")
    return found[0]


def keep(name: str) -> bool:
    """Whether a file of the flashinfer wheel is needed to import it and JIT the sampling ops."""
    if name.startswith(DROP_PREFIXES):
        return False
    if name.startswith("flashinfer/data/csrc/"):
        rest = name[len("flashinfer/data/csrc/"):]
        if "/" in rest:  # other kernels' folders
            return False
        # top-level headers are small and shared; of the .cu files only the sampling ones
        return not rest.endswith(".cu") or rest in SAMPLING_CSRC
    if name.startswith(("flashinfer/data/include/", "flashinfer/data/cccl/")):
        return True
    if name.startswith("flashinfer/") and name.endswith(CUDA_SOURCE_SUFFIXES):
        return False  # CUDA sources of other JIT modules, next to their Python code
    return True


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(src: pathlib.Path, dst: pathlib.Path) -> tuple[int, int]:
    """Copy the wheel keeping only `keep` files; rewrite RECORD. Returns (kept, dropped)."""
    kept = dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED,
                                                      compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename == record_name or info.is_dir():
                continue
            if not keep(info.filename):
                dropped += 1
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            lines.append(record_line(info.filename, data))
            kept += 1
        lines.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(lines) + "\n")
    return kept, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=".whl", help="output folder (default .whl)")
    ap.add_argument("--python-version", default="3.12", help="the device's python (3.12)")
    ap.add_argument("--flashinfer-version", default=FLASHINFER_VERSION)
    ap.add_argument("--curand-headers", action="store_true",
                    help="also store cuRAND headers under DEST/curand_include")
    args = ap.parse_args()

    dest = pathlib.Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in list(dest.glob("flashinfer_python-*.whl")) + list(dest.glob("apache_tvm_ffi-*.whl")):
        old.unlink()  # one version of each, or the offline install stops
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        fi = pip_download(f"flashinfer-python=={args.flashinfer_version}", tmp, args.python_version)
        kept, dropped = slim_wheel(fi, dest / fi.name)
        print(f"{fi.name}: {fi.stat().st_size / 1e6:.1f} MB -> "
              f"{(dest / fi.name).stat().st_size / 1e6:.1f} MB ({kept} files kept, {dropped} dropped)")
        tvm = pip_download(f"apache-tvm-ffi=={TVM_FFI_VERSION}", tmp, args.python_version)
        shutil.copy2(tvm, dest / tvm.name)
        print(f"{tvm.name}: {tvm.stat().st_size / 1e6:.1f} MB")
        if args.curand_headers:
            cur = pip_download(f"nvidia-curand=={CURAND_VERSION}", tmp, args.python_version)
            out = dest / "curand_include"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            with zipfile.ZipFile(cur) as z:
                for n in z.namelist():
                    if "/include/" in n and n.endswith(".h"):
                        (out / pathlib.PurePosixPath(n).name).write_bytes(z.read(n))
            print(f"cuRAND headers -> {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{dest}: {total / 1e6:.1f} MB in all")


if __name__ == "__main__":
    main()
