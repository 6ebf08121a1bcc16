"""Is the CUDA toolchain really usable for compiling SPARD's CUDA kernels? (used by setup.py)

torch.utils.cpp_extension guesses CUDA_HOME as the grandparent of the first nvcc on PATH, which
for a wrapper script in /usr/local/bin is /usr/local: the build then fails to link -lcudart
after a long compile. Here a toolkit counts only when it holds nvcc, the CUDA headers and
libcudart, and an nvcc on PATH is asked where its toolkit is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile


def toolkit_problem(home: str) -> str | None:
    """Why ``home`` is not a usable CUDA toolkit (None when it is): the nvcc, the headers and
    the libcudart that CUDAExtension links (``-L$CUDA_HOME/lib64 -lcudart``)."""
    needed = [os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"),
              os.path.join("lib64", "libcudart.so")]
    missing = [p for p in needed if not os.path.exists(os.path.join(home, p))]
    if missing:
        return f"{home} is not a CUDA toolkit (no {', '.join(missing)})"
    return None


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder an nvcc belongs to, as nvcc itself reports it (TOP in a dry run), so
    a wrapper script or symlink in /usr/local/bin still leads to the toolkit."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "-dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_home(environ=os.environ, which=shutil.which, nvcc_top=_nvcc_top) -> tuple[str | None, str]:
    """(toolkit folder, how it was found) or (None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            problem = toolkit_problem(home)
            return (None, f"{var}={home}: {problem}") if problem else (home, f"from {var}")
    nvcc = which("nvcc")
    if nvcc:
        candidates = [nvcc_top(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
        for home in candidates:
            if home and toolkit_problem(home) is None:
                return home, f"found through {nvcc}"
        return None, f"{nvcc} is on PATH but its toolkit was not found ({toolkit_problem(candidates[-1])})"
    if toolkit_problem("/usr/local/cuda") is None:
        return "/usr/local/cuda", "the default location"
    return None, "no nvcc found (set CUDA_HOME to the CUDA toolkit)"


def nvcc_version(home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan(torch_cuda: str | None, flag: str, target_cuda: str | None,
              find=find_cuda_home, version_of=nvcc_version, *, gpu_visible: bool = False,
              arch_list: str = "") -> tuple[str | None, str]:
    """(CUDA toolkit folder to build with, or None for CPU kernels only; the reason).

    ``flag`` is SPARD_EXT_CUDA ("0", "1" or ""); ``target_cuda`` the CUDA version of the torch
    SPARD is being installed next to ("" for a CPU-only torch, None when unknown);
    ``gpu_visible`` whether torch sees a GPU here; ``arch_list`` is TORCH_CUDA_ARCH_LIST. The
    CUDA kernels are built only when asked for: a visible GPU, SPARD_EXT_CUDA=1 or
    TORCH_CUDA_ARCH_LIST (compiling them for nobody costs minutes). Raises RuntimeError when
    SPARD_EXT_CUDA=1 asks for what cannot be built.
    """
    if flag == "0":
        return None, "SPARD_EXT_CUDA=0"
    arch_list = arch_list.strip()
    if flag == "1":
        asked = "SPARD_EXT_CUDA=1"
    elif arch_list:
        asked = f"TORCH_CUDA_ARCH_LIST={arch_list}"
    elif gpu_visible:
        asked = "a GPU is visible"
    else:
        return None, "no GPU is visible (SPARD_EXT_CUDA=1 or TORCH_CUDA_ARCH_LIST builds them anyway)"
    problem = None
    home, how = None, ""
    if torch_cuda is None:
        problem = "the torch compiled against is a CPU-only build"
    else:
        home, how = find()
        if home is None:
            problem = how
        else:
            nvcc = version_of(home)
            if nvcc is None:
                problem = f"cannot run {os.path.join(home, 'bin', 'nvcc')} --version"
            elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
                problem = (f"nvcc {nvcc} in {home} does not match torch's CUDA {torch_cuda} "
                           "(the major versions must agree)")
    if flag == "1":
        if problem:
            raise RuntimeError(f"SPARD_EXT_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        return home, f"SPARD_EXT_CUDA=1, CUDA toolkit {home} ({how})"
    if problem:
        return None, f"{asked}, but {problem}"
    if target_cuda == "":
        return None, "the torch of the target environment is CPU-only (SPARD_EXT_CUDA=1 forces CUDA)"
    return home, f"{asked}, CUDA toolkit {home} ({how})"
