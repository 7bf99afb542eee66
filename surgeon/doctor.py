"""``surgeon doctor``: what a user pastes into a bug report."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from typing import Any


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    from surgeon import __version__
    from surgeon.checkpoint import cache_dir
    from surgeon.gguf import smollm2_gguf_path

    info: dict[str, Any] = {
        "surgeon": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "safetensors", "huggingface_hub",
                                               "numba", "triton", "diffusers", "peft", "gguf", "accelerate",
                                               "pydantic", "typer")},
    }
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except Exception as e:  # noqa: BLE001  # pragma: no cover (doctor reports, never fails)
        info["torch_error"] = str(e)
    try:
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
        info["numba_threading_layer"] = numba.config.THREADING_LAYER
    except Exception as e:  # noqa: BLE001  # pragma: no cover (doctor reports, never fails)
        info["numba_error"] = str(e)
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    try:  # the C kernels (torch-free merges, the TIES tie order, ShiftAdd's AVX2 GEMV) are built on first use
        from surgeon.kernels import host_merge, tie_order
        from surgeon.kernels.cbuild import kernel_folder

        info["c_kernels"] = {"merge": host_merge.available(["float32"]), "tie_order": tie_order.available(1),
                             "folder": str(kernel_folder())}
    except Exception as e:  # noqa: BLE001  # pragma: no cover (doctor reports, never fails)
        info["c_kernels_error"] = str(e)
    cache = cache_dir()
    info["cache_dir"] = str(cache)
    info["hf_home"] = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    info["hf_token_set"] = bool(os.environ.get("HF_TOKEN"))  # presence only, never the value
    gguf = smollm2_gguf_path()
    info["demo_gguf"] = str(gguf) if gguf else None
    converted = sorted(str(p) for p in (cache / "gguf").glob("SmolLM2*")) if (cache / "gguf").is_dir() else []
    info["demo_model_converted"] = converted
    return info


def render(info: dict[str, Any], console: Any = None) -> None:
    """One row per fact; long values (paths) wrap instead of being cut, so they can be copied."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="surgeon doctor", show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        t.add_row(k, str(v))
    (console or Console()).print(t)
