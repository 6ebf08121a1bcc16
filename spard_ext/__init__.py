"""SPARD's compiled kernels.

    from spard_ext import project_, dpp_greedy

The ops are also registered as ``torch.ops.spard_ext.*`` (CPU and, when built with CUDA, CUDA
dispatch keys) with fake implementations, so they trace under ``torch.compile``.
``spard_ext.reference`` holds plain-torch implementations of every op; the tests compare the
kernels against it.
"""

try:
    import torch  # noqa: F401  (loads libtorch, which the kernels link against)
except ModuleNotFoundError as e:  # SPARD leaves installing torch to the user (pyproject.toml)
    raise ImportError("spard_ext: SPARD needs torch >= 2.10, which is not installed here: install the build you "
                      "want first (CPU: pip install torch --index-url https://download.pytorch.org/whl/cpu; "
                      "CUDA: the command pytorch.org gives), or pip install 'spard[torch]'") from e

from ._loader import load as _load

# Loading the libraries registers torch.ops.spard_ext.* (CPU, and CUDA when loaded); a build that
# does not fit this torch stops here with an ImportError that says what to do. CUDA_KERNELS:
# whether the CUDA kernels are loaded (they were built, and this torch is a CUDA build).
_C, CUDA_KERNELS, _NOTE = _load(__name__)

from . import _autograd, _fake  # noqa: E402,F401
from .dpp import DppResult, dpp_greedy  # noqa: E402
from .flat import FlatLayout, StaleLayoutError  # noqa: E402
from .project import ProjectionResult, project_, project_apply_, project_reduce  # noqa: E402

__all__ = [
    "CUDA_KERNELS",
    "DppResult",
    "FlatLayout",
    "ProjectionResult",
    "StaleLayoutError",
    "dpp_greedy",
    "project_",
    "project_apply_",
    "project_reduce",
]
