"""Helpers shared by the merge tests (no tests here): perturbed copies of a tiny model, contexts, LoRA folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from surgeon.context import Context
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint


def perturbed_copy(src: Path, dst: Path, *, seed: int, scale: float = 0.02, only: str | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """``dst`` = ``src`` with Gaussian noise added to every float tensor (names containing ``only``, if given)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copyfile(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        sd = load_file(str(f))
        out = {}
        for k, v in sd.items():
            if v.dtype.is_floating_point and (only is None or only in k):
                v = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype)
            out[k] = v.contiguous()
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    return dst


def graph_of(path: Path | str) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(str(path)))


def context_for(models: dict[str, Path | str], base: str | None = None) -> tuple[Graph, Context]:
    graphs = {k: graph_of(v) for k, v in models.items()}
    primary = graphs[base] if base is not None else next(iter(graphs.values()))
    return primary, Context(graphs=graphs, base_name=base, quiet=True)


def state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_lora(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, r: int, alpha: float,
              rslora: bool = False, base: str = "tiny", extra: dict | None = None) -> Path:
    """A PEFT-layout adapter folder written by hand (not by our writer), as peft saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), "base_model_name_or_path": base,
           "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    cfg.update(extra or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder
