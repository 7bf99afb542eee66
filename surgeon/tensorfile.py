"""The safetensors file layout, shared by the reader (:mod:`surgeon.checkpoint`), the writer (:mod:`surgeon.writer`)
and the framework's small files (:mod:`surgeon.storage`): dtype names, header padding, tensor bytes. It imports
neither side, so the reader never needs the writer.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NamedTuple

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import numpy as np
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
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
_WIDTH = {name: width for name, width in SAFETENSORS_DTYPES.values()}


# dtypes by name: the graph knows a tensor's dtype without importing torch ----------------------------------------
def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (imports torch)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SurgeonError(f"unknown dtype {name!r}")
    return dtype


def dtype_width(name: str) -> int:
    """Bytes per element of the dtype ``name``."""
    width = _WIDTH.get(name)
    if width is None:  # a dtype safetensors cannot store (complex, ...): torch knows
        import torch

        width = torch.empty((), dtype=torch_dtype(name)).element_size()
    return width


class HostArray(NamedTuple):
    """A tensor as raw storage in a numpy array (``data``: flat, of :data:`surgeon.kernels.host_dtypes.STORAGE`
    [dtype]; bfloat16 as uint16), for graphs that run without torch."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]


def header_bytes(header: dict[str, Any]) -> bytes:
    """The 8-byte length + JSON header, space-padded so the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def as_tensor(value: torch.Tensor | HostArray) -> torch.Tensor:
    """A host value as a torch tensor sharing its memory (a tensor as it is)."""
    if not isinstance(value, HostArray):
        return value
    import torch

    return torch.from_numpy(value.data).view(torch_dtype(value.dtype)).reshape(value.shape)


def as_host(value: torch.Tensor | HostArray) -> HostArray:
    """A tensor's raw storage as a :class:`HostArray` (a host value as it is)."""
    if isinstance(value, HostArray):
        return value
    import torch

    from surgeon.kernels.host_dtypes import STORAGE

    t = value.detach().contiguous().cpu()
    name = dtype_name(t.dtype)
    return HostArray(t.reshape(-1).view(torch.uint8).numpy().view(STORAGE[name]), name, tuple(t.shape))


def tensor_bytes(t: torch.Tensor | HostArray) -> memoryview:
    """The raw little-endian bytes of ``t`` (a contiguous CPU copy when needed)."""
    if isinstance(t, HostArray):
        return memoryview(t.data.reshape(-1).view("u1"))
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
