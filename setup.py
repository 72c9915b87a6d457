"""Build script: the Python package plus the optional C++/CUDA extension ``seqrec_fast._C``.

The extension is compiled from every ``.cpp`` under ``csrc/`` (except the framework-free unit
tests in ``csrc/tests``), plus every ``.cu`` when torch has CUDA and ``nvcc`` is found.

Environment variables:
  SEQREC_FAST_SKIP_EXT=1        do not build the extension at all (pure Python install)
  SEQREC_FAST_SKIP_CUDA=1       build the CPU extension only, even with CUDA torch + nvcc
  SEQREC_FAST_CUDA_ARCHS="80;90" CUDA architectures (default "80;90": real sm_80 and sm_90 code)
  SEQREC_FAST_REQUIRE_EXT=1     make a failed extension build an error (CI sets it); otherwise a
                                failed build only warns and ``import seqrec_fast`` still works.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["seqrec_fast", "seqrec_fast.*"]) + ["seqrec_fast.kernels"]
PACKAGE_DIR = {"seqrec_fast": "seqrec_fast", "seqrec_fast.kernels": "kernels"}


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extension_kwargs():
    if _flag("SEQREC_FAST_SKIP_EXT"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("seqrec_fast: torch not importable at build time, skipping the C++ extension")
        return {}

    sources = sorted(
        p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
        if not p.startswith(os.path.join("csrc", "tests"))
    )
    cu_sources = sorted(
        p for p in glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
        if not p.startswith(os.path.join("csrc", "tests"))
    )
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) is not None
        and not _flag("SEQREC_FAST_SKIP_CUDA")
        and bool(cu_sources)
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("SEQREC_FAST_NATIVE", "0") == "1":
        cxx.append("-march=native")
    define = []
    extra = {"cxx": cxx}
    if use_cuda:
        archs = os.environ.get("SEQREC_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = []
        for a in archs:
            a = a.strip().replace(".", "")
            if a:
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        # PTX of the newest arch as well, so later GPUs can JIT it.
        last = archs[-1].strip().replace(".", "")
        gencode += [f"-gencode=arch=compute_{last},code=compute_{last}"]
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + gencode
        define.append(("SEQREC_FAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "seqrec_fast._C", sources + cu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra, define_macros=define, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "seqrec_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra, define_macros=define, extra_link_args=["-fopenmp"])

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - reported and re-raised when required
                if _flag("SEQREC_FAST_REQUIRE_EXT"):
                    raise
                print(f"seqrec_fast: WARNING: C++ extension build failed ({exc}); "
                      "the package installs without it (backends 'cpp'/'cuda' unavailable).",
                      file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    **_extension_kwargs(),
)
