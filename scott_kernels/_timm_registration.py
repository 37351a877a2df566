"""Registers the SCOTT ViTs with timm whichever of ``scott_kernels`` and ``timm`` is imported first.

timm has no plugin discovery for model registries (its registry fills as modules decorated with
``register_model`` are imported), so ``scott_kernels.timm_models`` has to be imported once timm is.
When timm is already imported, that happens at once; otherwise a finder placed at the front of
``sys.meta_path`` waits for ``import timm`` (or any ``timm.*``, which imports ``timm`` first), lets
the regular machinery find and execute timm, then imports ``scott_kernels.timm_models`` and takes
itself off ``sys.meta_path``. Importing ``scott_kernels`` alone never imports timm.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

_MODULE = "scott_kernels.timm_models"


def _register() -> None:
    try:
        importlib.import_module(_MODULE)
    except Exception as exc:  # never break `import timm`; say why the SCOTT ViTs are missing
        warnings.warn(f"the SCOTT ViTs could not be registered with timm ({type(exc).__name__}: {exc}); "
                      f"`import {_MODULE}` shows the full error", RuntimeWarning, stacklevel=3)


class _LoaderThenRegister(importlib.abc.Loader):
    """timm's own loader, followed by the registration once timm's ``__init__`` has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # the spec and the module keep pointing at timm's own loader (resources, reloads, pickling)
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class TimmImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on ``import timm`` it asks the finders after it for timm's spec and
    wraps that spec's loader so that the SCOTT ViTs register after timm has loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        remove_finder()   # once: later imports of timm find it in sys.modules
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportFinder)]


def register_when_timm_is_imported() -> None:
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(f, TimmImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmImportFinder())
