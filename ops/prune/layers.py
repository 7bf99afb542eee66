"""Depth pruning: remove whole decoder blocks, chosen by block influence ("ShortGPT", Men et al., "ShortGPT: Layers
in Large Language Models are More Redundant Than You Expect", arXiv 2403.03853; ``icip-cas/ShortGPT``) or given.

Block influence of block i (eq. 1): BI_i = 1 − E_{X,t}[ x_{i,t}ᵀ x_{i+1,t} / (‖x_{i,t}‖ ‖x_{i+1,t}‖) ], with x_i the
block's input hidden states and x_{i+1} its output, averaged over every calibration token. The k blocks of lowest
BI are removed in one shot (measured once on the dense model, as the reference does). The following blocks are
renumbered and the config's layer count (and per-layer lists such as ``layer_types``) follow, so the output
loads in transformers and vLLM like a model trained at that depth.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from surgeon import engine
from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

from .common import ARCH_HELP

if TYPE_CHECKING:
    from surgeon.arch import Roles

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config keys transformers reads the depth from


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    remove: int | None = Field(None, ge=1, description="Remove this many blocks: those of lowest block influence "
                               "(1 - cos(input, output)) on the calibration text.")
    layers: list[int] | None = Field(None, description="Remove exactly these blocks (0-based indices, e.g. 3,7); "
                                     "no calibration.")
    data: str = Field("model:32", description="Calibration text for the block influence: a .txt/.jsonl file, a "
                      "datasets folder, or 'model:N' (N sequences sampled from the model itself).")
    seqlen: int = Field(512, ge=2, le=2048, description="Tokens per calibration window (capped by the model's "
                        "context).")
    n_windows: int = Field(64, ge=1, le=4096, description="Number of calibration windows.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during calibration.")
    arch: dict[str, Any] | None = Field(None, description=ARCH_HELP)

    @model_validator(mode="after")
    def _one_choice(self) -> Params:
        if (self.remove is None) == (self.layers is None):
            raise ValueError("give either remove (how many blocks, chosen by block influence) or layers (which)")
        return self


# --- block influence ----------------------------------------------------------------------------------------------

def token_cosines(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """cos(x_in, x_out) per token (fp64) for hidden states ``[..., d]``; a zero vector counts as 0.5, as in
    the reference (its NaN is replaced by 0.5)."""
    a = h_in.reshape(-1, h_in.shape[-1]).double()
    b = h_out.reshape(-1, h_out.shape[-1]).double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return cos.nan_to_num(nan=0.5)


class InfluenceMeter:
    """Accumulates Σ_t (1 − cos) and the token count per block over micro-batches (eq. 1 of ShortGPT)."""

    def __init__(self, n_blocks: int):
        self.sums = [0.0] * n_blocks
        self.counts = [0] * n_blocks

    def add(self, block: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        cos = token_cosines(h_in, h_out)
        self.sums[block] += float((1 - cos).sum())
        self.counts[block] += cos.numel()

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks (each ran its slice of the samples); no-op in one process."""
        from surgeon.engine import dist

        if not dist.active():
            return
        t = torch.tensor(self.sums + [float(c) for c in self.counts], dtype=torch.float64)
        dist.all_reduce_(t)
        n = len(self.sums)
        self.sums, self.counts = t[:n].tolist(), [int(c) for c in t[n:].tolist()]

    def influence(self) -> list[float]:
        """BI per block (mean over tokens)."""
        if not all(self.counts):
            raise SurgeonError("prune.layers: a block saw no calibration tokens")
        return [s / c for s, c in zip(self.sums, self.counts)]


def least_influential(bi: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest BI (ties: the lower index), in ascending index order."""
    if not 0 < k < len(bi):
        raise SurgeonError(f"prune.layers: --remove {k}: expected 1 to {len(bi) - 1} for a {len(bi)}-block model")
    return sorted(sorted(range(len(bi)), key=lambda i: (bi[i], i))[:k])


# --- graph edit ----------------------------------------------------------------------------------------------

def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Sorted unique block indices, each in range, leaving at least one block."""
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SurgeonError(f"prune.layers: --layers {bad[0]}: out of range (the model has blocks 0..{n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise SurgeonError(f"prune.layers: --layers lists a block twice ({list(layers)})")
    if len(layers) >= n_layers:
        raise SurgeonError(f"prune.layers: removing {len(layers)} of {n_layers} blocks leaves none")
    return sorted(layers)


def renumbering(names: Sequence[str], prefixes: Sequence[str], remove: Sequence[int]) -> tuple[list[str], dict[str, str]]:
    """(tensors to drop, ``{old name: new name}``) when blocks ``remove`` go and later blocks move down."""
    gone = set(remove)
    new_index = {}
    for i in range(len(prefixes)):
        if i not in gone:
            new_index[i] = len(new_index)
    drop: list[str] = []
    rename: dict[str, str] = {}
    for name in names:
        i = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        if i is None:
            continue
        if i in gone:
            drop.append(name)
        elif new_index[i] != i:
            rename[name] = prefixes[new_index[i]] + name[len(prefixes[i]):]
    return drop, rename


def shrink_config(config: dict[str, Any], n_layers: int, remove: Sequence[int]) -> list[str]:
    """Set the layer count to ``n_layers − len(remove)`` and drop the removed entries of every per-layer list
    (a list with one entry per block, e.g. ``layer_types``). Returns the keys changed."""
    gone = set(remove)
    changed = []
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = n_layers - len(gone)
            changed.append(key)
    if not changed:
        raise SurgeonError(f"prune.layers: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)})")
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == n_layers and key not in changed:
            config[key] = [v for i, v in enumerate(value) if i not in gone]
            changed.append(key)
    return changed


def remove_blocks(graph: Graph, roles: Roles, remove: Sequence[int]) -> tuple[Graph, dict[str, Any]]:
    """A copy of ``graph`` without blocks ``remove`` (later blocks renumbered, config fixed) and report facts."""
    remove = check_layers(list(remove), roles.n_layers)
    drop, rename = renumbering(graph.names(), roles.prefixes, remove)
    out = graph.copy()
    out.remove(*drop)
    out.rename(rename)
    changed = shrink_config(out.config, roles.n_layers, remove)
    removed_params = sum(_numel(graph[n].shape) for n in drop)
    removed_bytes = sum(graph[n].nbytes for n in drop)
    facts = {"removed_layers": remove, "layers_before": roles.n_layers, "layers_after": roles.n_layers - len(remove),
             "removed_parameters": removed_params, "removed_bytes": removed_bytes, "config_keys_changed": changed}
    return out, facts


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --- wiring ---------------------------------------------------------------------------------------------------------

def measure_influence(graph: Graph, params: Params, ctx: Context, roles: Roles) -> list[float]:
    """BI of every block on the calibration windows: the dense model run block by block on the engine."""
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.n_windows)
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=params.batch_size, roles=roles)
    meter = InfluenceMeter(roles.n_layers)
    with ctx.timed("calibrate"):
        for block in eng.blocks(tokens, record=False, progress=ctx.progress):
            outs = block.forward(keep=True)
            for j, (_, h) in enumerate(block.inputs()):
                meter.add(block.index, h, outs.get(j, eng.device))
    meter.all_reduce()
    ctx.report(calibration_windows=int(tokens.shape[0]), calibration_seqlen=int(tokens.shape[1]), **eng.timing())
    return meter.influence()


@register("prune.layers", Params, model_level=True,
          summary="Remove whole decoder blocks, by block influence or by index (ShortGPT).")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Depth pruning: remove whole decoder blocks (by block influence or by index)."""
    roles = ctx.roles(graph, overrides=params.arch)
    if params.layers is not None:
        remove = check_layers(params.layers, roles.n_layers)
        bi = None
    else:
        if not params.remove < roles.n_layers:
            raise SurgeonError(f"prune.layers: --remove {params.remove}: the model has {roles.n_layers} blocks; "
                               f"at most {roles.n_layers - 1} can go")
        bi = measure_influence(graph, params, ctx, roles)
        remove = least_influential(bi, params.remove)
    out, facts = remove_blocks(graph, roles, remove)
    if bi is not None:
        facts["block_influence"] = [round(b, 6) for b in bi]
    ctx.report(method="layers", **facts)
    return out
