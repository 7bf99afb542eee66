"""``surgeon inspect``: what a checkpoint is, from headers alone (tensor reads only for ``--sparsity``)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from surgeon.errors import SurgeonError


def inspect_checkpoint(source: str, *, sparsity: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    from surgeon.sources import open_checkpoint

    ck = open_checkpoint(source, allow_pickle=allow_pickle)
    cfg = ck.config
    dtypes: Counter[str] = Counter()
    params = 0
    nbytes = 0
    largest = ("", 0)
    for name, t in ck.tensors.items():
        dtypes[t.dtype] += t.numel
        params += t.numel
        nbytes += t.nbytes
        if t.nbytes > largest[1]:
            largest = (name, t.nbytes)
    info: dict[str, Any] = {
        "source": source,
        "path": str(ck.path),
        "components": sorted(c or "(root)" for c in ck.components),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
        "hidden_size": cfg.get("hidden_size", cfg.get("n_embd")),
        "tensors": len(ck.tensors),
        "parameters": params,
        "bytes": nbytes,
        "dtypes": dict(dtypes),
        "largest_tensor": {"name": largest[0], "bytes": largest[1]},
        "tied_word_embeddings": bool(cfg.get("tie_word_embeddings", False)) or (
            "lm_head.weight" not in ck.tensors and any(n.endswith("embed_tokens.weight") for n in ck.tensors)),
        "files": sorted({str(t.file.name) for t in ck.tensors.values()}),
        "side_files": sorted(ck.side_files),
        "quantization_config": cfg.get("quantization_config"),
    }
    try:
        from surgeon.arch import LayerCountError, roles_for

        roles_for(cfg, list(ck.tensors))
    except LayerCountError as e:  # the same words every op refuses with
        info["problems"] = [str(e)]
    except SurgeonError:
        pass  # an architecture surgeon does not know: nothing to check layers against
    if sparsity:
        per = {}
        zeros = 0
        for name in ck.tensors:
            v = ck.load(name)
            z = int((v == 0).sum())
            zeros += z
            per[name] = round(z / max(1, v.numel()), 6)
        info["sparsity"] = per
        info["zero_fraction"] = zeros / max(1, params)
    return info


def render_inspection(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"surgeon inspect {info['source']}", show_header=False)
    for key in ("model_type", "architectures", "components", "layers", "hidden_size", "tensors", "parameters",
                "bytes", "dtypes", "largest_tensor", "tied_word_embeddings", "files", "side_files"):
        v = info.get(key)
        if key in ("parameters", "bytes") and isinstance(v, int):
            v = f"{v:,}"
        t.add_row(key, str(v))
    if "zero_fraction" in info:
        t.add_row("zero_fraction", f"{info['zero_fraction']:.4f}")
    console.print(t)
    for problem in info.get("problems", []):
        console.print(f"[bold red]problem:[/bold red] {problem}", highlight=False)
    if "sparsity" in info:
        s = Table("tensor", "zero fraction")
        for n, z in info["sparsity"].items():
            s.add_row(n, f"{z:.4f}")
        console.print(s)
