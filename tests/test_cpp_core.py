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


def test_ci_runs_the_cmake_build():
    # on CI (CI=true) a missing cmake must fail, not skip test_cmake_build_and_ctest unseen: the
    # machine image carries cmake (and nvcc, for tests/test_routing_cuda_build.py)
    if os.environ.get("CI") != "true":
        pytest.skip("only on CI")
    assert shutil.which("cmake") is not None, "CI has no cmake: the C++ core's ctest would skip"
    assert shutil.which("ctest") is not None, "CI has no ctest"
