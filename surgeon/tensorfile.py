"""The safetensors file layout, shared by the reader (:mod:`surgeon.checkpoint`), the writer (:mod:`surgeon.writer`)
and the framework's small files (:mod:`surgeon.storage`): dtype names, header padding, tensor bytes. It imports
neither side, so the reader never needs the writer.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

#: safetensors dtype string -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
TORCH_TO_SAFETENSORS = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}


def header_bytes(header: dict[str, Any]) -> bytes:
    """The 8-byte length + JSON header, space-padded so the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (a contiguous CPU copy when needed)."""
    import torch

    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A deterministic safetensors file (keys sorted, metadata sorted) for small side outputs such as undo
    files and adapters. ``safetensors.torch.save`` orders metadata by a per-process hash, so two identical runs
    would otherwise differ byte for byte."""
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in TORCH_TO_SAFETENSORS:
            raise SurgeonError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        data = bytes(tensor_bytes(t))
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dt], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    return header_bytes(header) + b"".join(blobs)
