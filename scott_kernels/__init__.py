"""scott-kernels: the SCOTT sparse convolutional tokenizer, computed only over visible patches."""

from __future__ import annotations

from . import _triton_compat  # noqa: F401  (Triton 3.6's interpreter under NumPy 2.4+)
from .functional import available_backends, keep_from_indices, select_backend, sparse_conv_tokenize
from .module import SparseConvTokenizer, masked
from .reference import reference_tokenize

__version__ = "0.1.0"

from . import _timm_registration

# The SCOTT ViTs join timm's registry (scott_kernels.timm_models) as soon as timm is imported,
# before or after this package, without this import paying for importing timm.
_timm_registration.register_when_timm_is_imported()
__all__ = [
    "SparseConvTokenizer",
    "masked",
    "sparse_conv_tokenize",
    "keep_from_indices",
    "reference_tokenize",
    "available_backends",
    "select_backend",
    "build_info",
]


def build_info() -> dict:
    """What the native module was compiled with, and what can run here."""
    import os

    import torch

    from . import _C

    info = dict(_C.build_info())
    info["cpp_only"] = not info["cuda"]
    info["torch"] = torch.__version__
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        import triton

        info["triton"] = triton.__version__
        info["triton_usable"] = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    except ImportError:
        info["triton"] = None
        info["triton_usable"] = False
    return info
