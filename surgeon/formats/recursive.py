"""The compact recursive format of ``surgeon tie``, and the PEFT adapter beside its unrolled forms.

Compact form: the shared block once (``model.shared_layers.{k}.…``), per-layer ``….lora_A.weight`` /
``….lora_B.weight`` for relaxed linears, untied per-layer tensors under their own names, and
``config["recursion"]`` (``layer_prefix``/``shared_prefix`` templates, ``layer_to_slot``, ``lora_alpha_ratio``).
:func:`load_recursive` turns it into a transformers model whose tied layers share storage.

``lora/adapter_model.safetensors`` + ``lora/adapter_config.json`` (:func:`peft_adapter_files`) relax the unrolled
tied base with plain transformers + peft.
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

from surgeon.formats.model_types import RECURSION_KEY

ADAPTER_DIR = "lora"


def peft_adapter_files(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, base: str | None,
                       alpha_ratio: float = 1.0, fan_in_fan_out: bool = False) -> dict[str, str | bytes]:
    """``lora/adapter_model.safetensors`` + ``lora/adapter_config.json`` for ``{module: (A [r, in], B [out, r])}``.

    lora_alpha = alpha_ratio · r per module (scale ``alpha_ratio``); the most common rank is ``r``, the others go
    into ``rank_pattern`` with ``alpha_pattern`` = alpha_ratio · their rank; targets are the exact module names.
    """
    from safetensors.torch import save

    from surgeon.lora import adapter_config, adapter_tensors

    ranks = {module: int(a.shape[0]) for module, (a, _) in factors.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(counts, key=lambda r: (counts[r], r))
    # PEFT full-matches pattern keys as "(.*\.)?key": an escaped full module name hits that module only
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r0}
    config = adapter_config(base_model=base, target_modules=sorted(ranks), r=r0, alpha=alpha_ratio * r0,
                            rank_pattern=pattern, alpha_pattern={m: alpha_ratio * r for m, r in pattern.items()},
                            fan_in_fan_out=fan_in_fan_out)
    return {f"{ADAPTER_DIR}/adapter_model.safetensors": save(adapter_tensors(factors), metadata={"format": "pt"}),
            f"{ADAPTER_DIR}/adapter_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


def load_recursive(path: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu"):
    """Load a compact recursive checkpoint written by ``surgeon tie`` as a transformers causal LM.

    Every unrolled layer's tied weight is the *same* ``nn.Parameter`` as its slot's (one storage, shared
    ``data_ptr``); relaxed linears are wrapped in :class:`RecursiveLoRALinear` that adds ``s·B(Ax)`` with
    s = ``recursion["lora_alpha_ratio"]`` (1 when absent).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgeon.sources import open_checkpoint

    ck = open_checkpoint(path)
    rec = ck.config.get(RECURSION_KEY)
    if not isinstance(rec, dict):
        raise SurgeonError(f"{path}: config.json has no 'recursion' entry; not a compact checkpoint from "
                           f"`surgeon tie` (materialized outputs load with AutoModelForCausalLM)")
    cfg = AutoConfig.for_model(**ck.config)  # the base architecture's config (surgeon.formats.from_disk)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        torch_dtype = next((getattr(torch, t.dtype) for t in ck.tensors.values()), torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    loaded: set[str] = set()

    def tensor(name: str) -> torch.Tensor:
        loaded.add(name)
        return ck.load(name).to(torch_dtype)

    for pname, param in list(model.named_parameters(remove_duplicate=True)):
        if pname in ck.tensors:  # embeddings, final norm, head, untied per-layer vectors
            param.data = tensor(pname)
    shared_params: dict[str, torch.nn.Parameter] = {}
    for l, k in enumerate(rec["layer_to_slot"]):
        _tie_layer(model, ck.tensors, tensor, shared_params, rec["layer_prefix"].format(i=l),
                   rec["shared_prefix"].format(k=k), float(rec.get("lora_alpha_ratio", 1.0)), path)
    missing = set(ck.tensors) - loaded
    if missing:
        raise SurgeonError(f"{path}: tensors not used by the recursive model: {', '.join(sorted(missing)[:4])}")
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


def _tie_layer(model, stored, tensor, shared_params: dict, lp: str, sp: str, scale: float, path: str) -> None:
    """Point layer ``lp``'s tied parameters at slot ``sp``'s shared ones; wrap its relaxed linears."""
    import torch

    block = model.get_submodule(lp.rstrip("."))
    for pname, _ in list(block.named_parameters()):
        own, common = lp + pname, sp + pname
        if own in stored:
            continue
        if common not in stored:
            raise SurgeonError(f"{path}: neither {own!r} nor the shared {common!r} is in the checkpoint")
        if common not in shared_params:
            shared_params[common] = torch.nn.Parameter(tensor(common), requires_grad=False)
        owner, _, attr = pname.rpartition(".")
        setattr(block.get_submodule(owner) if owner else block, attr, shared_params[common])
    for mname, module in list(block.named_modules()):
        a_name = f"{lp}{mname}.lora_A.weight"
        if not mname or a_name not in stored:
            continue
        wrapped = _recursive_lora_class()(module, tensor(a_name), tensor(f"{lp}{mname}.lora_B.weight"), scale)
        owner, _, attr = mname.rpartition(".")
        setattr(block.get_submodule(owner) if owner else block, attr, wrapped)


@functools.cache
def _recursive_lora_class():
    import torch

    class RecursiveLoRALinear(torch.nn.Module):
        """A shared linear (``base``, whose weight is the slot's parameter) plus this layer's ``scale·B(Ax)``."""

        def __init__(self, base: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0):
            super().__init__()
            self.base = base
            self.scale = scale
            self.lora_A = torch.nn.Parameter(lora_a, requires_grad=False)  # [r, in]
            self.lora_B = torch.nn.Parameter(lora_b, requires_grad=False)  # [out, r]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lora = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A), self.lora_B)
            return self.base(x) + (lora if self.scale == 1.0 else self.scale * lora)

    return RecursiveLoRALinear


def __getattr__(name: str):  # keep torch out of import time (surgeon --help stays fast)
    if name == "RecursiveLoRALinear":
        cls = _recursive_lora_class()
        globals()["RecursiveLoRALinear"] = cls
        return cls
    raise AttributeError(name)
