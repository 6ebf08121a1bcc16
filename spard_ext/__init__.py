"""SPARD's compiled kernels.

    from spard_ext import project_, dpp_greedy

The ops are also registered as ``torch.ops.spard_ext.*`` (CPU and, when built with CUDA, CUDA
dispatch keys) with fake implementations, so they trace under ``torch.compile``.
``spard_ext.reference`` holds plain-torch implementations of every op; the tests compare the
kernels against it.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loading the library registers torch.ops.spard_ext.*)
from . import _fake  # noqa: F401
from .dpp import DppResult, dpp_greedy
from .project import ProjectionResult, project_, project_apply_, project_reduce

CUDA_KERNELS: bool = bool(_C.cuda_kernels)
"""Whether this build contains the CUDA kernels."""

__all__ = [
    "CUDA_KERNELS",
    "DppResult",
    "ProjectionResult",
    "dpp_greedy",
    "project_",
    "project_apply_",
    "project_reduce",
]
