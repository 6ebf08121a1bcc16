"""Builds the `spard_ext` kernels; the package metadata lives in pyproject.toml.

Two shared libraries, so that a build with CUDA kernels still imports under a CPU-only torch:
- ``spard_ext._C``: the op schemas and the CPU kernels, on the LibTorch stable ABI (compiled with
  ``TORCH_TARGET_VERSION``, calls torch only through its C shim): one build loads under every
  torch from ``STABLE_TARGET`` on;
- ``spard_ext._C_cuda``: the CUDA kernels, on the same stable ABI and target (with their own
  input checks, csrc/cuda/checks.cpp); loaded only under a CUDA build of torch >= ``STABLE_TARGET``
  of the CUDA major it was compiled for (libcudart's soname carries the major).
A ``_build_info.json`` next to them records the torch they were compiled against, the stable
target of both libraries and the CUDA major of the CUDA kernels (see spard_ext/_loader.py).

The CUDA kernels are compiled when asked for (a visible GPU, SPARD_EXT_CUDA=1, or
TORCH_CUDA_ARCH_LIST) and the toolchain is really usable: torch is a CUDA build, nvcc is found
(CUDA_HOME / CUDA_PATH, else the nvcc on PATH, else /usr/local/cuda) in a toolkit that has the
headers and libcudart, and its major version is torch's. A machine without a GPU compiles them
when SPARD_EXT_CUDA=1 or TORCH_CUDA_ARCH_LIST says so (CI does, to catch CUDA compile errors).
SPARD_EXT_CUDA=0 forces them off, SPARD_EXT_CUDA=1 forces them on (and stops with the reason
when it cannot). The build prints which, in one line. With SPARD_EXT_CUDA=1 and no
TORCH_CUDA_ARCH_LIST and no visible GPU we build for 8.0;9.0.
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
# The stable-ABI version _C targets: the oldest torch SPARD supports (2.10: lists and strings in
# schemas, parallel_for, typed data pointers); the hex form is TORCH_TARGET_VERSION's (one byte
# each for major and minor, then patch and tweak).
STABLE_TARGET = MIN_TORCH
STABLE_TARGET_HEX = f"0x{STABLE_TARGET[0]:02x}{STABLE_TARGET[1]:02x}000000000000"
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
                             os.environ.get(TARGET_CUDA_ENV), gpu_visible=torch.cuda.is_available(),
                             arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
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
    # No OpenMP: the CPU kernels run on torch's thread pool, through torch::stable::parallel_for.
    exts = [cpp.CppExtension("spard_ext._C", cpu_sources,
                             extra_compile_args={"cxx": ["-O3", f"-DTORCH_TARGET_VERSION={STABLE_TARGET_HEX}"]})]
    if home is not None:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        # USE_CUDA: the CUDA part of torch's C shim (the current stream, CUDA error messages).
        # Hidden visibility: the library exports nothing (its ops register when it is loaded), and
        # its types may hold the stable ABI's hidden ones.
        stable = [f"-DTORCH_TARGET_VERSION={STABLE_TARGET_HEX}", "-DUSE_CUDA"]
        exts.append(cpp.CUDAExtension(
            "spard_ext._C_cuda", cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden", *stable],
                                "nvcc": ["-O3", "-Xcompiler=-fvisibility=hidden", *stable]}))

    class BuildExt(cpp.BuildExtension):
        """torch's BuildExtension (ninja), plus the build info file."""

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
                    "stable_abi": ".".join(map(str, STABLE_TARGET)),
                    "cuda_kernels": home is not None,
                    # The CUDA kernels are on the stable ABI too; what they need of torch is its
                    # CUDA major (spard_ext/_loader.py refuses another with the reinstall command).
                    "cuda_stable_abi": ".".join(map(str, STABLE_TARGET)) if home else None,
                    "cuda_major": int(torch.version.cuda.split(".")[0]) if home else None,
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
