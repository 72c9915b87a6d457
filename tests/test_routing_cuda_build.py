"""Compiles the torch binding of the CUDA routing kernels (csrc/routing/routing_cuda.cu) with nvcc.

CI has nvcc but CPU torch, so setup.py never builds the .cu files there; this object-only
compile (no link, no GPU) at least checks the binding against torch's headers. The
framework-free kernels themselves are compiled by CMake (tests/test_cpp_core.py) and run by
csrc/tests/test_routing_cuda.cu where a GPU exists.

The binding has no device code and hides its body from nvcc's device pass, so the compile is
one host parse of the torch headers (about 40 s of CPU on the CI machine).
"""
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "routing", "routing_cuda.cu")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc"),
                  "/usr/local/cuda/bin/nvcc")
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_routing_cuda_binding_compiles(tmp_path):
    import torch
    from torch.utils.cpp_extension import include_paths

    obj = tmp_path / "routing_cuda.o"
    cmd = [
        _nvcc(), "-c", SRC, "-o", str(obj), "-std=c++17", "-arch=sm_90",
        "-DSEQREC_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # the flags torch's CUDAExtension adds
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-w",
        "-I", os.path.join(ROOT, "csrc"), "-I", sysconfig.get_paths()["include"],
    ]
    cmd += [f"-I{p}" for p in include_paths()]
    # CPU wheels ship c10/cuda headers without the CMake-generated cuda_cmake_macros.h (it only
    # defines the Windows export macro); CUDA wheels have it.
    generated = os.path.join(include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(generated):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    data = obj.read_bytes()
    for name in (b"routing_fwd_cuda", b"routing_bwd_cuda"):
        assert name in data, f"{name.decode()} is not registered by {SRC}"
