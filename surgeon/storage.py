"""The file I/O that ops need, done by the framework on their behalf (through :class:`surgeon.context.Context`).

- :func:`read_side_file`: bytes of a user-named side file (requests, facts, metrics, a tokenizer folder's
  files), with one-line errors that name the option and the path.
- :func:`content_fingerprint`: sha256 of a side file's or folder's content (cache keys).
- :class:`CacheEntry`: a content-addressed safetensors file under ``$SURGEON_CACHE/<namespace>/`` written
  atomically; a damaged entry reads as a miss.
- :class:`StateFolder`: a folder for resumable state (a JSON document and tensor files streamed tensor by
  tensor), either the user's (kept) or a temporary one (removed when the last reader is gone).
- :class:`TensorSpill`: a safetensors file written header first, one tensor at a time, in a known order; the
  bounded-memory way to keep many changed tensors on disk and read them back lazily.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.checkpoint import Checkpoint

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def read_side_file(path: str | os.PathLike, *, what: str) -> bytes:
    """The bytes of ``path``; ``what`` names the option or field that gave it (``--requests``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SurgeonError(f"{what}: {p} does not exist")
    if p.is_dir():
        raise SurgeonError(f"{what}: {p} is a folder, expected a file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise SurgeonError(f"{what}: cannot read {p} ({e.strerror or e})") from None


def content_fingerprint(path: str | os.PathLike) -> str | None:
    """sha256 of a file's or a folder's content (each file's relative name, then its bytes, in sorted order);
    ``None`` when nothing exists at ``path`` (then it names something else, e.g. ``model:N``)."""
    import hashlib

    p = Path(path).expanduser()
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_tokenizer_folder(folder: str | os.PathLike, *, cls: str, what: str) -> Any:
    """A transformers tokenizer of class ``cls`` (``CLIPTokenizer``, ``AutoTokenizer``) from a tokenizer folder."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise SurgeonError(f"{what}: {p} is not a folder")
    import transformers

    try:
        return getattr(transformers, cls).from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizer files can fail in many ways; name the folder
        raise SurgeonError(f"{what}: {p}: cannot load a {cls} ({e.__class__.__name__}: {e})") from None


def hub_cached_folder(repo: str, filename: str) -> Path | None:
    """The local Hub cache folder of ``repo`` that holds ``filename`` (never downloads); None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, filename)
    return Path(hit).parent if isinstance(hit, str) else None


def decode_json(data: bytes, *, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise SurgeonError(f"{where}: invalid JSON ({detail})") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CacheEntry:
    """One cached result: ``load()`` gives its tensors (``None`` on a miss or a damaged file), ``save()``
    stores them with string metadata."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.enabled or not self.path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path))
        except Exception:  # noqa: BLE001 - any unreadable entry
            return None  # a damaged entry is recomputed, never trusted

    def save(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        if not self.enabled:
            return
        from surgeon.tensorfile import safetensors_bytes

        write_atomic(self.path, safetensors_bytes(dict(tensors), dict(metadata or {})))


def cache_entry(namespace: str, key: str, *, enabled: bool = True) -> CacheEntry:
    from surgeon.checkpoint import cache_dir

    if not namespace.isidentifier() or not all(c.isalnum() or c in "-_." for c in key) or not key:
        raise SurgeonError(f"internal: cache key {namespace}/{key} has characters a file name cannot hold")
    return CacheEntry(cache_dir() / namespace / f"{key}.safetensors", enabled=enabled)


class TensorSpill:
    """A safetensors file written in the order of ``shapes``, one tensor at a time (the header is known up
    front), then renamed into place by :meth:`close`. ``abort`` removes the partial file."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: str = "float32"):
        if dtype not in _ST_DTYPES:
            raise SurgeonError(f"internal: spill dtype {dtype} is not supported")
        import torch

        self.path, self.dtype = path, getattr(torch, dtype)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n, shp in shapes.items():
            size = itemsize * math.prod(shp)
            header[n] = {"dtype": _ST_DTYPES[dtype], "shape": list(shp), "data_offsets": [off, off + size]}
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
        self.partial = path.with_name(path.name + ".partial")
        self.fh = open(self.partial, "wb")  # noqa: SIM115 - closed by close()/abort()
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.order, self.shapes, self.i = list(shapes), dict(shapes), 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.i >= len(self.order) or self.order[self.i] != name:
            raise SurgeonError(f"internal: {self.path.name}: tensor {name!r} written out of order")
        if tuple(t.shape) != tuple(self.shapes[name]):
            raise SurgeonError(f"internal: {self.path.name}: tensor {name!r} has shape {list(t.shape)}, "
                               f"declared {list(self.shapes[name])}")
        from surgeon.tensorfile import tensor_bytes

        self.fh.write(tensor_bytes(t.detach().to("cpu", self.dtype).contiguous()))
        self.i += 1

    def close(self) -> Path:
        self.fh.close()
        if self.i != len(self.order):
            self.partial.unlink(missing_ok=True)
            raise SurgeonError(f"internal: {self.path.name}: {len(self.order) - self.i} tensor(s) never written")
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        self.fh.close()
        self.partial.unlink(missing_ok=True)


class StateFolder:
    """Resumable state of one op (OPCM's running merge): a JSON document and tensor files.

    A user-named folder is created if needed and kept; without one, a temporary folder lives as long as any
    checkpoint opened from it (lazy nodes that read it) and is removed afterwards.
    """

    def __init__(self, folder: str | os.PathLike | None, *, what: str, prefix: str = "surgeon-state-"):
        self.what = what
        self.temporary = folder is None
        self.path = Path(tempfile.mkdtemp(prefix=prefix)) if folder is None else Path(folder).expanduser()
        self._open = [1]  # this object + every checkpoint opened from the folder; removed at zero
        if self.temporary:
            weakref.finalize(self, self._drop, self.path, self._open)

    @staticmethod
    def _drop(path: Path, count: list[int]) -> None:
        count[0] -= 1
        if count[0] == 0:
            shutil.rmtree(path, ignore_errors=True)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_json(self, name: str) -> Any:
        p = self.path / name
        if not p.is_file():
            raise SurgeonError(f"{self.what} {self.path}: missing {name}")
        return decode_json(read_side_file(p, what=self.what), where=str(p))

    def write_json(self, name: str, obj: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / name, (json.dumps(obj, indent=1) + "\n").encode())

    def spill(self, name: str, shapes: Mapping[str, tuple[int, ...]], dtype: str = "float32") -> TensorSpill:
        self.path.mkdir(parents=True, exist_ok=True)
        return TensorSpill(self.path / name, shapes, dtype)

    def tensors(self, name: str) -> Checkpoint:
        """The tensor file ``name`` as a lazily read checkpoint (graph ``Load`` nodes can point into it)."""
        from surgeon.checkpoint import open_file

        p = self.path / name
        if not p.is_file():
            raise SurgeonError(f"{self.what} {self.path}: missing {name}")
        ck = open_file(p)
        if self.temporary:
            self._open[0] += 1
            weakref.finalize(ck, self._drop, self.path, self._open)
        return ck
