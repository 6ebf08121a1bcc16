"""Builds the `spard_ext` kernels; the package metadata lives in pyproject.toml.

Two shared libraries, so that a build with CUDA kernels still imports under a CPU-only torch:
- ``spard_ext._C``: the op schemas and the CPU kernels; links only torch's CPU libraries;
- ``spard_ext._C_cuda``: the CUDA kernels; links ``_C`` (for the shared input checks) and torch's
  CUDA libraries, and is loaded only under a CUDA build of torch.
A ``_build_info.json`` next to them records the torch they were compiled against; spard_ext
refuses to load them under another torch release (see spard_ext/_loader.py).

The CUDA kernels are compiled when the toolchain is really usable: torch is a CUDA build, nvcc
is found (CUDA_HOME / CUDA_PATH, else the nvcc on PATH, else /usr/local/cuda) in a toolkit that
has the headers and libcudart, and its major version is torch's. A CPU-only machine with that
toolchain still compiles them, so CI catches CUDA compile errors without a GPU. SPARD_EXT_CUDA=0
forces them off, SPARD_EXT_CUDA=1 forces them on (and stops with the reason when it cannot).
TORCH_CUDA_ARCH_LIST is honoured; without it and without a visible GPU we build for 8.0;9.0.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from spard_build import MIN_TORCH, TARGET_CUDA_ENV, release, too_old_message  # noqa: E402
from spard_toolchain import cuda_plan, nvcc_version  # noqa: E402

BUILD_INFO = "_build_info.json"
# Commands that compile the kernels (everything else, e.g. sdist and metadata, needs no torch).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "develop", "editable_wheel", "install", "bdist"}


def _note(message: str) -> None:
    print(f"spard setup: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Extensions
# ----------------------------------------------------------------------------------------------
def _wants_build(argv) -> bool:
    return any(arg in BUILD_COMMANDS for arg in argv[1:])


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _extensions_and_cmdclass():
    if os.environ.get("SPARD_EXT_SKIP_BUILD") == "1":  # the Makefile builds in place afterwards
        return [], {}
    torch = _import_torch()
    if torch is None:
        if _wants_build(sys.argv):
            raise SystemExit("SPARD's kernels are compiled against torch, which is not installed here: "
                             "install torch first, or let pip build in isolation (pip install .)")
        return [], {}  # metadata and sdist need no torch
    rel = release(torch.__version__)
    if rel is not None and rel[:2] < MIN_TORCH:  # also for metadata: before pip resolves anything
        raise SystemExit(too_old_message(torch.__version__))
    if not _wants_build(sys.argv):
        return [], {}  # metadata, sdist: nothing to compile

    home, reason = cuda_plan(torch.version.cuda, os.environ.get("SPARD_EXT_CUDA", "").strip(),
                             os.environ.get(TARGET_CUDA_ENV))
    if home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported.
        os.environ["CUDA_HOME"] = home
    import torch.utils.cpp_extension as cpp

    if home is not None:
        cpp.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    _note(("building the CPU and CUDA kernels: " if home else "building the CPU kernels only: ") + reason)

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    exts = [cpp.CppExtension("spard_ext._C", cpu_sources, extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                             extra_link_args=["-fopenmp"])]
    if home is not None:
        exts.append(cpp.CUDAExtension("spard_ext._C_cuda", sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))

    class BuildExt(cpp.BuildExtension):
        """torch's BuildExtension (ninja), plus: _C_cuda links _C, and the build info file."""

        def build_extension(self, ext):
            if ext.name == "spard_ext._C":
                # A soname, so that _C_cuda records the plain file name and finds it next to itself.
                ext.extra_link_args = ext.extra_link_args + [
                    "-Wl,-soname," + os.path.basename(self.get_ext_filename("spard_ext._C"))]
            elif ext.name == "spard_ext._C_cuda":
                ext.extra_link_args = ext.extra_link_args + [
                    self.get_ext_fullpath("spard_ext._C"), "-Wl,-rpath,$ORIGIN"]
            super().build_extension(ext)

        def run(self):
            folders = [os.path.join(self.build_lib, "spard_ext")]  # what a wheel packs
            if self.inplace or getattr(self, "editable_mode", False):
                folders.append(self.get_finalized_command("build_py").get_package_dir("spard_ext"))
            # A CUDA library left there by an earlier build is not of this build.
            if home is None:
                for stale in (p for f in folders for p in glob.glob(os.path.join(f, "_C_cuda.*"))):
                    os.remove(stale)
            super().run()
            info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "cuda_kernels": home is not None,
                    "cuda_toolkit": nvcc_version(home) if home else None}
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, BUILD_INFO + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(info, f, indent=1)
                os.replace(tmp, os.path.join(folder, BUILD_INFO))

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(
    packages=["spard_ext"] + find_packages("python"),
    package_dir={"spard_ext": "spard_ext", "": "python"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
