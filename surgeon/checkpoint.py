"""Read-only, lazy view of a checkpoint: headers are parsed and validated up front, tensor bytes on demand.

Inputs: a folder (one ``*.safetensors`` file or shards + ``*.safetensors.index.json``), a single
``.safetensors`` file, a diffusers pipeline folder (components ``unet/``, ``text_encoder/``, ...), and pickle
``.bin`` files only when ``allow_pickle`` is set. Which folder a source names (a path, a Hub repo id, a GGUF file
converted once into the cache, ``builtin:``) is decided in :mod:`surgeon.sources`, which may write (a GGUF
conversion); this reader never imports the writer.

Tensor bytes are mapped per tensor, privately (copy-on-write), and unmapped when the tensor dies
(:mod:`surgeon.filemap`): reading the page cache at memory speed without a long-lived map of whole files, whose
pages would stay resident and make memory grow with the model instead of staying flat. Where a file cannot be
mapped (or a tensor's offset is not aligned to its element size), it is read with ``preadv`` into a fresh buffer.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.filemap import truncated
from surgeon.formats.model_types import from_disk
from surgeon.numeric import check_finite
from surgeon.tensorfile import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, HostArray  # noqa: F401 (re-exported)

SAFETENSORS_WIDTH = {name: width for name, width in SAFETENSORS_DTYPES.values()}


MAX_HEADER_BYTES = 100_000_000

#: files that are weights or bookkeeping; everything else in a model folder is a side file carried to the output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
NOT_CARRIED = {"README.md", "surgeon.json", ".gitattributes"}
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype (torch name) and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Component:
    """One weight-carrying part of a checkpoint (the root model, or ``unet``/``text_encoder`` of a pipeline)."""

    name: str  # "" for a plain model folder
    folder: Path
    weights_stem: str  # "model" or "diffusion_pytorch_model"
    config: dict[str, Any] | None


@dataclass
class Checkpoint:
    """A validated, lazily read checkpoint. ``tensors`` maps graph names (``component/name`` for pipelines)."""

    path: Path
    tensors: dict[str, TensorInfo]
    components: dict[str, Component]
    side_files: dict[str, Path] = field(default_factory=dict)  # relative output path -> source file
    pickle_state: dict[str, Any] | None = None  # tensors of an allowed pickle checkpoint, loaded eagerly
    source_id: str = ""  # what the user passed (repo id, file, folder)
    allow_nonfinite: bool = False  # when False, a tensor holding NaN/Inf is refused as it is read

    @property
    def config(self) -> dict[str, Any]:
        root = self.components.get("")
        if root is not None and root.config is not None:
            return root.config
        return {}

    def load(self, name: str, *, check: bool | None = None):
        """One tensor as a torch tensor of its own (a private map of the file, or a fresh buffer).

        NaN/Inf values are refused unless ``allow_nonfinite`` (or ``check=False``, for ops that look for corrupt
        tensors on purpose, like ``recover``)."""
        import torch

        if self.pickle_state is not None:
            t = self.pickle_state[name].clone()
        else:
            info = self._info(name)
            t = torch.from_numpy(source_bytes(info)).view(getattr(torch, info.dtype)).reshape(info.shape)
            if t.data_ptr() % COMPUTE_ALIGNMENT:
                # a map at an unaligned file offset: CPU GEMMs on it take other vector paths and round differently
                # (~1e-7) from the same values in an aligned buffer, so results would depend on the file's layout
                t = t.clone()
        if (not self.allow_nonfinite) if check is None else check:
            check_finite(name, t)
        return t

    def load_host(self, name: str, *, check: bool | None = None) -> HostArray:
        """One safetensors tensor as raw storage in a numpy array, without torch (see :meth:`load`)."""
        from surgeon.kernels.host_dtypes import STORAGE

        if self.pickle_state is not None:
            raise SurgeonError(f"{self.path}: {name!r} is in a pickle checkpoint, not raw safetensors bytes")
        info = self._info(name)
        value = HostArray(source_bytes(info).view(STORAGE[info.dtype]), info.dtype, info.shape)
        if (not self.allow_nonfinite) if check is None else check:
            check_finite_host(name, value)
        return value

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise SurgeonError(f"{self.path}: no tensor named {name!r}")
        return info

    def header_fingerprint(self) -> dict[str, Any]:
        """Input sizes and sha256 of each weight file's header, for provenance."""
        out = {}
        for f in sorted({t.file for t in self.tensors.values()}):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0] if f.suffix == ".safetensors" else 0
                head = fh.read(n) if n else b""
            out[str(f)] = {"bytes": f.stat().st_size, "header_sha256": hashlib.sha256(head).hexdigest()}
        return out


#: byte alignment of the tensors :meth:`Checkpoint.load` hands to computations (torch's CPU allocator's)
COMPUTE_ALIGNMENT = 64


def source_bytes(info: TensorInfo, start: int = 0, nbytes: int | None = None):
    """Bytes ``[start, start + nbytes)`` of a tensor (all of them by default) as a writable uint8 numpy array of
    its own: a private map where the file can be mapped and the offset suits the dtype, else a fresh buffer."""
    import numpy as np

    from surgeon.filemap import map_bytes

    offset = info.begin + start
    nbytes = info.nbytes - start if nbytes is None else nbytes
    mapped = map_bytes(info.file, offset, nbytes) if offset % SAFETENSORS_WIDTH[info.dtype] == 0 else None
    if mapped is not None:
        return mapped
    buf = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        read_exact(info.file, offset, memoryview(buf))
    return buf


def check_finite_host(name: str, value: HostArray) -> None:
    """:func:`surgeon.numeric.check_finite` for raw storage (no torch)."""
    from surgeon.kernels.host_dtypes import has_nonfinite
    from surgeon.tensorfile import FLOAT_DTYPES

    if value.dtype in FLOAT_DTYPES and has_nonfinite(value.data, value.dtype):
        raise SurgeonError(f"tensor {name!r} contains NaN or Inf (pass --allow-nonfinite to accept it)")


def read_exact(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``path`` at ``offset``; a short read means the file was truncated underneath us."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        total = len(view)
        while done < total:
            n = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
            if n <= 0:
                raise truncated(path, offset + done, offset + total)
            done += n
    finally:
        os.close(fd)


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header without reading tensor data.

    Checks: header length inside the file, valid JSON object, known dtypes, shapes matching byte ranges,
    offsets inside the data buffer, no overlaps (holes are tolerated, as some writers align).
    """
    size = path.stat().st_size
    if size < 8:
        raise SurgeonError(f"{path}: truncated safetensors file ({size} bytes, expected at least 8)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SurgeonError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeonError(f"{path}: header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SurgeonError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise SurgeonError(f"{path}: __metadata__ must be an object of strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise SurgeonError(f"{path}: tensor {name!r}: entry is not an object")
        dt = entry.get("dtype")
        if not isinstance(dt, str) or dt not in SAFETENSORS_DTYPES:
            raise SurgeonError(f"{path}: tensor {name!r}: unknown dtype {dt!r} (expected one of "
                               f"{', '.join(SAFETENSORS_DTYPES)})")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise SurgeonError(f"{path}: tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise SurgeonError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        b, e = offs
        if e > data_len:
            raise SurgeonError(f"{path}: tensor {name!r}: data_offsets end {e} past the data buffer "
                               f"({data_len} bytes; truncated file?)")
        torch_dtype, width = SAFETENSORS_DTYPES[dt]
        numel = 1
        for s in shape:
            numel *= s
        if numel * width != e - b:
            raise SurgeonError(f"{path}: tensor {name!r}: shape {shape} of {dt} needs {numel * width} bytes, "
                               f"header gives {e - b}")
        spans.append((b, e, name))
        tensors[name] = TensorInfo(name, path, torch_dtype, tuple(shape), data_start + b, data_start + e)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise SurgeonError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _inside(folder: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _component_tensors(folder: Path, prefix: str) -> tuple[dict[str, TensorInfo], str, list[Path]]:
    """Tensors of one folder (single file or sharded with index). Returns (tensors, weight stem, files used)."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    files: list[Path]
    if indexes:
        index_path = indexes[0]
        stem = index_path.name[: -len(INDEX_SUFFIX)]
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception:  # noqa: BLE001 (any malformed index is one clear error)
            raise SurgeonError(f"{index_path}: not a valid index (expected a JSON object with 'weight_map')") from None
        wanted: dict[str, set[str]] = {}
        for tname, fname in weight_map.items():
            p = folder / str(fname)
            if os.path.isabs(str(fname)) or not _inside(folder, p):
                raise SurgeonError(f"{index_path}: weight_map entry {tname!r} points outside the folder: {fname!r}")
            if not p.is_file():
                raise SurgeonError(f"{index_path}: shard {fname!r} (for {tname!r}) is missing")
            # "./model.safetensors" and "model.safetensors" name one shard
            wanted.setdefault(os.path.normpath(str(fname)), set()).add(tname)
        files = [folder / f for f in sorted(wanted)]
        tensors: dict[str, TensorInfo] = {}
        for rel, f in zip(sorted(wanted), files):
            found, _ = parse_safetensors_header(f)
            for tname in sorted(wanted[rel]):
                if tname not in found:
                    raise SurgeonError(f"{index_path}: {tname!r} is mapped to {f.name} but that shard lacks it")
                tensors[prefix + tname] = found[tname]
        return tensors, stem, files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return {}, "model", []
    tensors = {}
    for f in files:
        if not _inside(folder, f):
            raise SurgeonError(f"{f}: symlink points outside the checkpoint folder")
        found, _ = parse_safetensors_header(f)
        for tname, info in found.items():
            if prefix + tname in tensors:
                raise SurgeonError(f"{f}: tensor {tname!r} also appears in another file of {folder}")
            tensors[prefix + tname] = info
    stem = files[0].stem if len(files) == 1 else "model"
    return tensors, stem, files


def read_utf8_text(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are one error naming the file, line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SurgeonError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as e:
        raise SurgeonError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return data if isinstance(data, dict) else None


def _side_files(root: Path, used: set[Path], component_dirs: set[Path]) -> dict[str, Path]:
    side: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p in used:
            continue
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(INDEX_SUFFIX) or str(rel) in NOT_CARRIED:
            continue
        if p.name == "config.json" and p.parent in component_dirs:
            continue  # component configs are rewritten by the writer
        if not _inside(root, p):
            continue
        side[str(rel)] = p
    return side


def open_folder(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    folder = Path(folder)
    model_index = _read_json(folder / "model_index.json")
    components: dict[str, Component] = {}
    tensors: dict[str, TensorInfo] = {}
    used: set[Path] = set()
    if model_index is not None:  # diffusers pipeline: one component per subfolder with weights
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found, stem, files = _component_tensors(sub, sub.name + "/")
            if not found:
                continue
            tensors.update(found)
            used.update(files)
            components[sub.name] = Component(sub.name, sub, stem, _read_json(sub / "config.json"))
    else:
        found, stem, files = _component_tensors(folder, "")
        tensors.update(found)
        used.update(files)
        components[""] = Component("", folder, stem, from_disk(_read_json(folder / "config.json")))
    pickle_state = None
    if not tensors:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
        if pickles and not allow_pickle:
            raise SurgeonError(f"{pickles[0]}: pickle checkpoints can run code when loaded; refused "
                               "(pass --allow-pickle to load it with torch.load(weights_only=True))")
        if pickles:
            pickle_state, tensors = _load_pickles(pickles)
            used.update(pickles)
        else:
            raise SurgeonError(f"{folder}: no *.safetensors weights found")
    side = _side_files(folder, used, {c.folder for c in components.values()})
    return Checkpoint(folder, tensors, components, side, pickle_state, str(folder))


def _load_pickles(files: list[Path]):
    import torch

    state: dict[str, Any] = {}
    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (unpickling refusals come in many types)
            raise SurgeonError(f"{f}: cannot load with weights_only=True ({e.__class__.__name__})") from None
        if isinstance(part, dict) and "state_dict" in part and isinstance(part["state_dict"], dict):
            part = part["state_dict"]
        for k, v in part.items():
            if isinstance(v, torch.Tensor):
                v = v.contiguous()
                state[k] = v
                infos[k] = TensorInfo(k, f, str(v.dtype).removeprefix("torch."), tuple(v.shape), 0,
                                      v.numel() * v.element_size())
    return state, infos


def open_file(path: Path) -> Checkpoint:
    tensors, _ = parse_safetensors_header(path)
    folder = path.parent
    config = from_disk(_read_json(folder / "config.json"))
    comp = Component("", folder, path.stem, config)
    return Checkpoint(path, tensors, {"": comp}, {}, None, str(path))


def cache_dir() -> Path:
    return Path(os.environ.get("SURGEON_CACHE", Path.home() / ".cache" / "surgeon"))
