"""Build specdiff_ext: hands the compiled core (specdiff_ext/_C) over to CMake + ninja.

Environment: CMAKE_ARGS (extra CMake arguments), SPECDIFF_CUDA (AUTO / ON / OFF),
SPECDIFF_CUDA_ARCHS (e.g. "90" or "80;90"), CMAKE_BUILD_PARALLEL_LEVEL (parallel jobs).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier build may point into a deleted isolated build environment
        # (pip's temporary pybind11/cmake): configure afresh every time.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPECDIFF_CUDA={os.environ.get('SPECDIFF_CUDA', 'AUTO')}",
        ]
        if "SPECDIFF_CUDA_ARCHS" in os.environ:
            args.append(f"-DSPECDIFF_CUDA_ARCHS={os.environ['SPECDIFF_CUDA_ARCHS']}")
        if os.environ.get("CUDACXX") is None and Path("/usr/local/cuda/bin/nvcc").exists():
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(Path(__file__).parent.resolve()), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs, "--verbose"], check=True)


setup(ext_modules=[CMakeExtension("specdiff_ext._C")], cmdclass={"build_ext": CMakeBuild})
