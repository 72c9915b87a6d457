"""Builds the framework-free C++ core with CMake and runs its own unit tests through ctest.

CUDA targets are compiled too when CMake finds a CUDA compiler (nvcc is on CI's machines, so
the CUDA kernels are at least compiled there even though no GPU runs them).
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "cmake"
    env = dict(os.environ)
    if shutil.which("nvcc") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
    def sh(*cmd):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout
    # one CUDA arch keeps the CI compile short; setup.py builds every arch users need
    sh("cmake", "-S", ".", "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
       "-DCMAKE_CUDA_ARCHITECTURES=90")
    sh("cmake", "--build", str(build), "-j2")
    out = sh("ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in out, out
