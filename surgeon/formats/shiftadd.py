"""The packed ShiftAdd format: how ``surgeon shiftadd`` stores a binary-coded linear, and how it is read back.

Per packed linear ``X`` (the module name, Linear orientation [N out, K in]):

- ``X.qweight`` uint8 [q, N, ⌈K/8⌉]: the q sign planes, 8 input columns per byte (LSB = first column);
- ``X.pot_exp`` int8 [q, N, G, t] and ``X.pot_sign`` uint8 [q, N, G]: each scale α as a sum of t signed powers of
  two (``ABSENT_EXP`` marks an unused term; bit i of ``pot_sign`` = term i negative), G = ⌈K/group_size⌉;
  or ``X.scales`` fp16 [q, N, G] (plain BCQ scales, ``pot_terms`` 0);
- ``X.perm`` int32 [K] (optional): the column order the planes are stored in (act-order);
- ``config["quantization_config"]`` with ``quant_method: "shiftadd"``, ``layout_version``, ``group_size`` and per
  module ``in_features`` (and ``transposed`` for Conv1D-style weights).

Readers: :func:`load_shiftadd` (a transformers model whose block linears run the LUT kernel) and
:func:`dense_view` (a graph with lazy dense weights, for model-level steps after a packed step). Writer side:
:func:`packed_tensors`, :func:`blob_layout`, :func:`quantization_config`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgeon.errors import SurgeonError
from surgeon.formats.model_types import SHIFTADD_QUANT_METHOD, from_disk, is_shiftadd_packed
from surgeon.kernels.shiftadd import PackedLinear

if TYPE_CHECKING:
    from surgeon.graph import Graph

LAYOUT_VERSION = 1
QUANT_METHOD = SHIFTADD_QUANT_METHOD
ABSENT_EXP = -128  # pot_exp value of an unused APoT term
PACKED_KEYS = ("qweight", "pot_exp", "pot_sign", "scales", "perm")


def module_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj`` (the packed tensors' prefix)."""
    if not weight_name.endswith(".weight"):
        raise SurgeonError(f"{weight_name}: expected a linear weight ending in '.weight'")
    return weight_name[: -len(".weight")]


# ------------------------------------------------------------------------------------------- scale encoding
def pot_decode(exps: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """fp32 scales from int8 exponents [..., t] (``ABSENT_EXP`` = unused term) and negative-term bits [...]."""
    terms = exps.shape[-1]
    e = exps.to(torch.float64)
    present = exps != ABSENT_EXP
    shifts = torch.arange(terms, device=neg.device)
    signs = 1.0 - 2.0 * ((neg.unsqueeze(-1).to(torch.int64) >> shifts) & 1).to(torch.float64)
    return torch.where(present, signs * torch.exp2(e), torch.zeros_like(e)).sum(-1).float()


def pot_decompose(values: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponents and sign bits of values that are already sums of ≤ ``terms`` signed powers of two.

    Re-running the greedy rounding on a rounded value may pick the other neighbouring power first, so each
    step tries both floor and ceil of log2|residual| (2^terms paths) and keeps the first path that is exact.
    """
    v = values.double()
    exps = torch.full((*v.shape, terms), ABSENT_EXP, dtype=torch.int8, device=v.device)
    neg = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    done = v == 0
    for path in range(2 ** terms):
        resid = v.clone()
        e = torch.full_like(exps, ABSENT_EXP)
        ng = torch.zeros_like(neg)
        for t in range(terms):
            nz = resid != 0
            k = torch.floor(torch.log2(resid.abs().clamp_min(1e-300))) + ((path >> t) & 1)
            term = torch.where(nz, torch.sign(resid) * torch.exp2(k), torch.zeros_like(resid))
            e[..., t] = torch.where(nz, k.clamp(-127, 127), torch.full_like(k, ABSENT_EXP)).to(torch.int8)
            ng |= ((term < 0).to(torch.uint8) << t)
            resid = resid - term
        hit = (resid == 0) & ~done
        exps[hit] = e[hit]
        neg[hit] = ng[hit]
        done |= hit
        if bool(done.all()):
            break
    if not bool(done.all()):
        raise SurgeonError(f"internal: a scale is not a sum of {terms} powers of two")
    return exps, neg


# ------------------------------------------------------------------------------------------- writer side
def packed_tensors(prefix: str, qweight: torch.Tensor, alpha: torch.Tensor, pot_terms: int,
                   perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The stored tensors of one packed linear under ``prefix`` (α already rounded to what is stored)."""
    out = {f"{prefix}.qweight": qweight}
    if pot_terms > 0:
        exps, neg = pot_decompose(alpha, pot_terms)
        out[f"{prefix}.pot_exp"] = exps
        out[f"{prefix}.pot_sign"] = neg
    else:
        out[f"{prefix}.scales"] = alpha.half()
    if perm is not None:
        out[f"{prefix}.perm"] = perm
    return out


def blob_layout(q: int, n: int, k: int, group_size: int, pot_terms: int) -> list[tuple[str, tuple, torch.dtype]]:
    """(key, shape, dtype) of each packed tensor of a [n, k] linear with ``q`` planes (no ``perm``)."""
    g = -(-k // group_size)
    parts = [("qweight", (q, n, -(-k // 8)), torch.uint8)]
    if pot_terms > 0:
        parts += [("pot_exp", (q, n, g, pot_terms), torch.int8), ("pot_sign", (q, n, g), torch.uint8)]
    else:
        parts += [("scales", (q, n, g), torch.float16)]
    return parts


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else
                               torch.iinfo(dtype).bits // 8)


def quantization_config(*, bits: int | None, bits_budget: float | None, group_size: int, pot_terms: int,
                        act_order: bool, calibrated: bool, bits_of: dict[str, int], transposed: dict[str, bool],
                        in_features: dict[str, int]) -> dict[str, Any]:
    """``config["quantization_config"]`` of a packed output; ``bits_of`` etc. are keyed by weight name."""
    modules = {module_name(n): {"bits": b, "in_features": in_features[n],
                                **({"transposed": True} if transposed.get(n) else {})}
               for n, b in bits_of.items()}
    return {"quant_method": QUANT_METHOD, "layout_version": LAYOUT_VERSION, "bits": bits, "bits_budget": bits_budget,
            "group_size": group_size, "pot_terms": pot_terms, "scale_format": "pot" if pot_terms > 0 else "fp16",
            "act_order": act_order, "calibrated": calibrated, "modules": modules}


# ------------------------------------------------------------------------------------------- reader side
def read_packed(tensors: dict[str, torch.Tensor], prefix: str, group_size: int, in_features: int
                ) -> PackedLinear:
    """Rebuild one :class:`PackedLinear` from its checkpoint tensors (``prefix`` = module name)."""
    qweight = tensors[f"{prefix}.qweight"]
    if f"{prefix}.pot_exp" in tensors:
        scales = pot_decode(tensors[f"{prefix}.pot_exp"], tensors[f"{prefix}.pot_sign"])
    elif f"{prefix}.scales" in tensors:
        scales = tensors[f"{prefix}.scales"].float()
    else:
        raise SurgeonError(f"{prefix}: packed linear without pot_exp/pot_sign or scales")
    perm = tensors.get(f"{prefix}.perm")
    if qweight.shape[-1] != -(-in_features // 8) or scales.shape[-1] != -(-in_features // group_size):
        raise SurgeonError(f"{prefix}: qweight {list(qweight.shape)} / scales {list(scales.shape)} do not fit "
                           f"{in_features} input features at group size {group_size}")
    return PackedLinear(qweight, scales, in_features, group_size, None if perm is None else perm.long())


def dense_view(graph: Graph) -> Graph:
    """A copy of a ShiftAdd-packed graph with every packed linear back as a lazy dense ``X.weight`` (fp32 Ŵ, the
    source orientation) and no ``quantization_config``: lets model-level steps (eval, ...) run after a packed
    shiftadd step. Graphs that are not packed come back unchanged."""
    from surgeon.graph import Apply

    if not is_shiftadd_packed(graph.config):
        return graph
    qc = graph.config["quantization_config"]
    out = graph.copy()
    del out.config["quantization_config"]
    gs = int(qc["group_size"])
    for prefix, info in qc.get("modules", {}).items():
        keys = [k for k in PACKED_KEYS if f"{prefix}.{k}" in out]
        k_in, tr = int(info["in_features"]), bool(info.get("transposed", False))
        n_out = out[f"{prefix}.qweight"].shape[1]

        def dense(*vals: torch.Tensor, keys: list[str] = keys, k_in: int = k_in, tr: bool = tr) -> torch.Tensor:
            t = {f"x.{k}": v for k, v in zip(keys, vals)}
            w = read_packed(t, "x", gs, k_in).dense()
            return w.T if tr else w

        node = Apply(dense, [out[f"{prefix}.{k}"] for k in keys], label="shiftadd-dequant",
                     shape=(k_in, n_out) if tr else (n_out, k_in), dtype=torch.float32)
        out.splice(f"{prefix}.qweight", {f"{prefix}.weight": node})
        out.remove(*(f"{prefix}.{k}" for k in keys[1:]))
    return out


class ShiftAddLinear(torch.nn.Module):
    """A linear layer stored as bit-planes + scales; ``forward`` runs :meth:`PackedLinear.matmul` (LUT GEMV for
    ≤ ``max_lut_batch`` rows, dequantise + BLAS above)."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, *, max_lut_batch: int = 8,
                 device: str = "auto"):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        self.max_lut_batch = max_lut_batch
        self.compute_device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.matmul(x, device=self.compute_device, max_lut_batch=self.max_lut_batch)
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.packed.bits}, "
                f"group_size={self.packed.group_size}")


def _read_packed_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture config, quantization_config) of a packed folder, checked."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SurgeonError(f"{folder}: no config.json (expected a folder written by `surgeon shiftadd`)")
    cfg = from_disk(json.loads(cfg_path.read_text()))
    qc = cfg.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise SurgeonError(f"{cfg_path}: quantization_config.quant_method is not {QUANT_METHOD!r} "
                           "(a --materialize output loads with transformers directly)")
    if int(qc.get("layout_version", 0)) > LAYOUT_VERSION:
        raise SurgeonError(f"{cfg_path}: layout_version {qc.get('layout_version')} is newer than this surgeon "
                           f"reads ({LAYOUT_VERSION})")
    return cfg, qc


def load_shiftadd(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  max_lut_batch: int = 8):
    """Load a ShiftAdd-packed folder as a transformers causal LM whose block linears are :class:`ShiftAddLinear`.

    ``device`` is where the model lives (``cpu`` or ``cuda``); on CPU the numba LUT kernel runs for ≤
    ``max_lut_batch`` rows, on CUDA the Triton one (see :data:`surgeon.kernels.shiftadd.KERNEL_CALLS`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgeon.sources import open_checkpoint

    folder = Path(path)
    cfg, qc = _read_packed_config(folder)
    group_size = int(qc["group_size"])
    ck = open_checkpoint(folder)
    tensors = {name: ck.load(name) for name in ck.tensors}
    config = AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prefixes = sorted({n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")})
    if not prefixes:
        raise SurgeonError(f"{folder}: no '*.qweight' tensors although config says quant_method shiftadd")
    for prefix in prefixes:
        info = qc.get("modules", {}).get(prefix)
        if not isinstance(info, dict) or "in_features" not in info:
            raise SurgeonError(f"{folder / 'config.json'}: quantization_config.modules has no in_features for "
                               f"{prefix}")
        packed = read_packed(tensors, prefix, group_size, int(info["in_features"]))
        packed = PackedLinear(packed.qweight.to(device), packed.scales.to(device), packed.in_features, group_size,
                              None if packed.perm is None else packed.perm.to(device))
        mod_name, _, leaf = prefix.rpartition(".")
        try:
            parent = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise SurgeonError(f"{folder}: packed module {prefix} does not exist in {cfg.get('model_type')}") from None
        setattr(parent, leaf, ShiftAddLinear(packed, tensors.get(f"{prefix}.bias"),
                                             max_lut_batch=max_lut_batch).to(device))
        for key in [k for k in tensors if k.startswith(prefix + ".") and k.count(".") == prefix.count(".") + 1]:
            tensors.pop(key)
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(dense, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SurgeonError(f"{folder}: tensor {missing[0]!r} is missing from the checkpoint")
    model.to(device)
    model.eval()
    return model
