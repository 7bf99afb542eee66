"""surgeon: offline model surgery on checkpoints.

Heavy modules (torch, transformers) are imported lazily so that ``surgeon --help`` stays fast.
"""
from __future__ import annotations

import importlib.util as _importlib_util
import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec
from pathlib import Path as _Path

__version__ = "0.1.0"


def _mount_checkout_folders() -> None:
    """Make ``surgeon.ops`` / ``surgeon.kernels`` the top-level ``ops/`` and ``kernels/`` of a source checkout.

    Those folders have no ``__init__.py`` on purpose (PEP 420): with the repository root on ``sys.path``
    (``python`` or ``pytest`` started there), a folder without ``__init__.py`` loses to any installed regular
    package, so ours never shadows Hugging Face's ``kernels`` (a transformers dependency) or PyPI's ``ops``.
    setuptools' editable finder cannot resolve a namespace folder nested under a mapped regular package, so the
    checkout mounts them here. A wheel install nests them under ``surgeon/`` and needs nothing.
    """
    here = _Path(__file__).resolve().parent
    for name in ("ops", "kernels"):
        full_name = f"{__name__}.{name}"
        folder = here.parent / name
        if full_name in _sys.modules or (here / name).is_dir() or not folder.is_dir():
            continue
        spec = _ModuleSpec(full_name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[full_name] = module
        globals()[name] = module


_mount_checkout_folders()


def _passive_openmp_waits() -> None:
    """Let torch's OpenMP threads sleep at barriers instead of spinning (unless the user chose a policy).

    Must happen before torch is imported. On a shared 2-core machine (load average 15-20) spinning threads
    starve each other: one SmolLM2 decoding step (12 rows) took 24 s wall / 2.6 s CPU with the default policy,
    0.58 s / 0.17 s with ``OMP_WAIT_POLICY=PASSIVE`` and 1.3 s with one thread; that is what made a default
    EMMET run (self-sampled statistics) take 38 minutes."""
    import os

    if "torch" not in _sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_passive_openmp_waits()


def _register_formats() -> None:
    """transformers loads surgeon's packed/compact outputs after ``import surgeon`` (see surgeon.formats)."""
    from surgeon.formats.hf import install_transformers_hook

    install_transformers_hook()


_register_formats()

__all__ = ["SurgeonError", "__version__", "load_recursive", "load_shiftadd", "open_checkpoint"]


def __getattr__(name: str):  # lazy public API
    if name == "SurgeonError":
        from surgeon.errors import SurgeonError

        return SurgeonError
    if name == "open_checkpoint":
        from surgeon.sources import open_checkpoint

        return open_checkpoint
    if name == "load_shiftadd":
        from surgeon.formats.shiftadd import load_shiftadd

        return load_shiftadd
    if name == "load_recursive":
        from surgeon.formats.recursive import load_recursive

        return load_recursive
    raise AttributeError(name)
