"""Compatibility of Triton's interpreter (TRITON_INTERPRET=1) with NumPy 2.4+ on Triton < 3.7.

Triton 3.6's interpreter turns a scalar kernel argument used as a Python integer (a loop bound
such as ``range(0, K_TOTAL, BLOCK_K)``) into ``int(array)`` on a one-element array; NumPy 2.4
made that an error ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7+
squeezes the array first; on older versions the same one-line conversion is installed here, so
the kernels run under the interpreter of either version.
"""

from __future__ import annotations

import os


def _needed() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy
        import triton
    except ImportError:
        return False

    def version(text):
        return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in text.split(".")[:2])

    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


def install() -> bool:
    """Patches the interpreter's scalar-to-index conversion where needed; True if it did."""
    if not _needed():
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scott_squeezed", False):
        return False

    def index(self):
        return int(self.handle.data.squeeze())

    def patch_lang_tensor(tensor, *scope):
        # Triton 3.5-3.6 pass a patch scope that records attributes; 3.4 sets them directly
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._scott_squeezed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


install()
