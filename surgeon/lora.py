"""PEFT LoRA adapters: read one lazily against a base, write one in PEFT's layout.

Reading (ALGORITHMS.md §1.2): ``adapter_config.json`` + ``adapter_model.safetensors``; keys
``base_model.model.<module>.lora_A.weight`` [r, d_in] and ``…lora_B.weight`` [d_out, r] (embeddings:
``lora_embedding_A`` [r, n_emb], ``lora_embedding_B`` [d, r], no ``.weight``). The delta is ``s·B·A`` with
``s = alpha/r`` (``alpha/√r`` with ``use_rslora``), ``rank_pattern``/``alpha_pattern`` overriding per module,
transposed for ``fan_in_fan_out`` (GPT-2 Conv1D) and for embeddings. Adapters are applied tensor by tensor
(``W + s·B·A`` in fp32) as lazy graph nodes, never through a ``PeftModel``.

Writing: :func:`write_peft_adapter` writes a folder that ``peft.PeftModel.from_pretrained`` loads, with explicit
module lists and ``lora_alpha = r`` unless told otherwise (SVD-derived adapters use s = 1).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.checkpoint import Checkpoint
    from surgeon.graph import Graph

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.(?P<adapter>[A-Za-z0-9_-]+))?(?P<suffix>\.weight)?$")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding ``adapter_config.json`` (a PEFT adapter, not a full model)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def adapter_folder(g: Graph) -> Path | None:
    """The PEFT adapter folder the graph ``g`` was opened from, or None for a full model."""
    for src in g.sources:
        p = Path(src.path)
        folder = p if p.is_dir() else p.parent
        if is_adapter_folder(folder) and any(".lora_" in n for n in g.names()):
            return folder
    return None


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: a key matches a module named exactly so or ending in ``.<key>`` (regex allowed)."""
    for key, value in patterns.items():
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return default


@dataclass
class LoraModule:
    """One adapted module: where its factors live and how they scale."""

    module: str  # module path inside the model, e.g. model.layers.0.self_attn.q_proj
    a_key: str  # tensor name in the adapter file
    b_key: str
    rank: int
    alpha: float
    scale: float
    embedding: bool = False
    target: str = ""  # base tensor it updates (resolved against a base)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily (factors are loaded on demand, one module at a time)."""

    folder: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]
    full_tensors: dict[str, str] = field(default_factory=dict)  # modules_to_save: base name -> adapter key

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return str(v) if v else None

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def factors(self, module: str, *, fold_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, d_in], B [d_out, r])`` in fp32, oriented as for a Linear ``W [d_out, d_in]``.

        Embedding LoRA is returned in the same orientation as its weight ``[n_emb, d]``: A [r, d], B [n_emb, r].
        With ``fold_scale`` the scale ``s`` is multiplied into B, so that ``ΔW = B @ A``.
        """
        m = self.modules[module]
        a = self.checkpoint.load(m.a_key).float()
        b = self.checkpoint.load(m.b_key).float()
        if m.embedding:  # PEFT: ΔW = (B_e A_e)ᵀ with A_e [r, n_emb], B_e [d, r]
            a, b = b.T.contiguous(), a.T.contiguous()
        if fold_scale:
            b = b * m.scale
        return a, b

    def delta(self, module: str) -> torch.Tensor:
        """``s·B·A`` in the orientation of the stored base tensor (transposed for ``fan_in_fan_out``)."""
        a, b = self.factors(module, fold_scale=True)
        d = b @ a
        return d.T.contiguous() if self.fan_in_fan_out and not self.modules[module].embedding else d

    # base resolution ----------------------------------------------------------------------------------
    def resolve(self, base: Graph, *, what: str | None = None) -> None:
        """Bind every module to a base tensor and check shapes; raise naming the tensor when it does not fit."""
        label = what or str(self.folder)
        names = set(base.names())
        for m in self.modules.values():
            target = _find_target(m.module, names)
            if target is None:
                raise SurgeonError(f"{label}: adapter module {m.module!r} has no weight in the base model "
                                   f"(looked for {m.module + '.weight'!r}); is this adapter for another base?")
            a_shape = self.checkpoint.tensors[m.a_key].shape
            b_shape = self.checkpoint.tensors[m.b_key].shape
            if m.embedding:
                expected = (a_shape[1], b_shape[0])
            else:
                expected = (b_shape[0], a_shape[1])
                if self.fan_in_fan_out:
                    expected = expected[::-1]
            if tuple(base[target].shape) != tuple(expected):
                raise SurgeonError(f"{label}: LoRA for {target!r} implies shape {list(expected)}, the base tensor "
                                   f"is {list(base[target].shape)}; this adapter was trained on another base model")
            m.target = target
        for tname, key in list(self.full_tensors.items()):
            stem, dot, leaf = tname.rpartition(".")
            target = tname if tname in names else _find_target(stem, names, suffix=dot + leaf)
            if target is None:
                raise SurgeonError(f"{label}: saved module tensor {tname!r} has no counterpart in the base model")
            shape = tuple(self.checkpoint.tensors[key].shape)
            if tuple(base[target].shape) != shape:
                raise SurgeonError(f"{label}: saved tensor {tname!r} has shape {list(shape)}, the base tensor is "
                                   f"{list(base[target].shape)}")
            if target != tname:
                self.full_tensors[target] = self.full_tensors.pop(tname)

    def apply_to(self, base: Graph, *, what: str | None = None) -> Graph:
        """A new graph ``W + s·B·A`` per adapted tensor (lazy: factors are read when the tensor is computed)."""
        from surgeon.graph import Apply, Load

        self.resolve(base, what=what)
        g = base.copy()
        for m in self.modules.values():
            transpose = self.fan_in_fan_out and not m.embedding
            g.nodes[m.target] = Apply(_adapted_fn(m.scale, m.embedding, transpose),
                                      [base[m.target], Load(self.checkpoint, m.a_key), Load(self.checkpoint, m.b_key)],
                                      label="lora")
        for target, key in self.full_tensors.items():
            g.nodes[target] = Apply(lambda w, v: v, [base[target], Load(self.checkpoint, key)], label="lora-saved")
        g.meta.setdefault("adapters", []).append({"adapter": str(self.folder), "modules": len(self.modules),
                                                   "ranks": sorted(self.ranks)})
        return g


def _adapted_fn(scale: float, embedding: bool, transpose: bool):
    def fn(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = b.float() @ a.float()
        if embedding or transpose:
            d = d.T
        return w.float() + scale * d

    return fn


def _find_target(module: str, names: set[str], suffix: str = ".weight") -> str | None:
    for cand in (module, module.removeprefix("model."), "model." + module):
        if cand + suffix in names:
            return cand + suffix
    return None


def open_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder (headers only; no tensor data)."""
    from surgeon.checkpoint import open_file, open_folder

    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise SurgeonError(f"{folder}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SurgeonError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise SurgeonError(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise SurgeonError(f"{cfg_path}: peft_type {peft_type!r} is not supported (expected LORA)")
    if config.get("use_dora"):
        raise SurgeonError(f"{cfg_path}: DoRA adapters (use_dora: true) are not supported")
    weights = folder / ADAPTER_WEIGHTS
    ck = open_file(weights) if weights.is_file() else open_folder(folder)
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in ck.tensors:
        name = key.removeprefix(PREFIX)
        m = _KEY.match(name)
        if m is None:
            if "lora_magnitude_vector" in name:
                raise SurgeonError(f"{weights}: {key!r} is a DoRA magnitude; DoRA adapters are not supported")
            if ".lora_" in name:
                raise SurgeonError(f"{weights}: unsupported LoRA tensor {key!r}")
            full[re.sub(r"\.modules_to_save\.[^.]+", "", name)] = key
            continue
        kind = m.group("kind")
        pairs.setdefault(m.group("module"), {})[kind] = key
    modules: dict[str, LoraModule] = {}
    for module, kinds in pairs.items():
        emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_key = kinds.get("lora_embedding_A" if emb else "lora_A")
        b_key = kinds.get("lora_embedding_B" if emb else "lora_B")
        if a_key is None or b_key is None:
            raise SurgeonError(f"{weights}: module {module!r} has only one of its two LoRA factors")
        a_shape, b_shape = ck.tensors[a_key].shape, ck.tensors[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise SurgeonError(f"{weights}: module {module!r}: LoRA factors must be 2-D (conv LoRA is not supported)")
        r = a_shape[0]
        if b_shape[1] != r:
            raise SurgeonError(f"{weights}: module {module!r}: lora_A is {list(a_shape)} but lora_B is "
                               f"{list(b_shape)} (ranks differ)")
        r_cfg = int(pattern_value(rank_pattern, module, r_default))
        if r_cfg != r:
            raise SurgeonError(f"{cfg_path}: module {module!r} has rank {r} in the weights but {r_cfg} in the config")
        alpha = float(pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = LoraModule(module, a_key, b_key, r, alpha, scale, emb)
    if not modules and not full:
        raise SurgeonError(f"{weights}: no LoRA tensors found")
    return LoraAdapter(folder, config, ck, modules, full)


# ---------------------------------------------------------------------------------------------------------
# writing


def adapter_config(*, base_model: str | None, target_modules: list[str] | str, r: int, alpha: float,
                   rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
                   fan_in_fan_out: bool = False, use_rslora: bool = False, task_type: str | None = "CAUSAL_LM",
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT (and vLLM) expect, with explicit module lists."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": float(alpha) if not float(alpha).is_integer() else int(alpha),
        "lora_dropout": 0.0,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    cfg.update(extra or {})
    return cfg


def adapter_tensors(tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT key layout for ``{module: (A [r, d_in], B [d_out, r])}``."""
    out = {}
    for module, (a, b) in tensors.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise SurgeonError(f"LoRA factors for {module!r}: A {list(a.shape)} and B {list(b.shape)} do not pair")
        out[f"{PREFIX}{module}.lora_A.weight"] = a.detach().to(dtype or a.dtype).contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = b.detach().to(dtype or b.dtype).contiguous()
    return out


def write_peft_adapter(folder: str | os.PathLike, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                       base_model: str | None, target_modules: list[str] | None = None, r: int | None = None,
                       alpha: float | None = None, alpha_equals_rank: bool = True, fan_in_fan_out: bool = False,
                       use_rslora: bool = False, task_type: str | None = "CAUSAL_LM",
                       dtype: torch.dtype | None = None, extra_config: Mapping[str, Any] | None = None,
                       extra_files: Mapping[str, str | bytes] | None = None, force: bool = False) -> Path:
    """Write ``{module: (A, B)}`` as a PEFT LoRA adapter folder (atomically: temp folder, then rename).

    ``r`` defaults to the most common rank; modules of other ranks go to ``rank_pattern``. With
    ``alpha_equals_rank`` (default, as for SVD-derived adapters) ``lora_alpha = r`` and ``alpha_pattern`` mirrors
    ``rank_pattern`` so every scale is 1; otherwise ``alpha`` (default ``r``) is used for all modules.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if not tensors:
        raise SurgeonError(f"{folder}: no LoRA modules to write")
    ranks = {m: int(a.shape[0]) for m, (a, _b) in tensors.items()}
    if r is None:
        counts: dict[int, int] = {}
        for v in ranks.values():
            counts[v] = counts.get(v, 0) + 1
        r = max(counts, key=lambda k: (counts[k], k))
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    if alpha_equals_rank and alpha is None:
        alpha_value: float = r
        alpha_pattern = {m: float(v) for m, v in rank_pattern.items()}
    else:
        alpha_value = float(alpha if alpha is not None else r)
        alpha_pattern = {}
    targets = target_modules if target_modules is not None else sorted(tensors)
    cfg = adapter_config(base_model=base_model, target_modules=list(targets), r=r, alpha=alpha_value,
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, fan_in_fan_out=fan_in_fan_out,
                         use_rslora=use_rslora, task_type=task_type, extra=extra_config)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise SurgeonError(f"{folder}: output folder exists and is not empty (pass --force to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(adapter_tensors(tensors, dtype=dtype), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for rel, content in (extra_files or {}).items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def module_of(tensor_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return tensor_name.removesuffix(".weight")
