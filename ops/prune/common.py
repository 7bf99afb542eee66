"""Shared pieces of the pruning ops: which tensors to prune, the ``Pruned`` node, N:M parsing, sparsity facts."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Executor, Load, Node

if TYPE_CHECKING:
    from surgeon.arch import Roles
    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.tensorfile import HostArray

INCLUDE_HELP = ("Selectors of the tensors to prune (role names like `mlp.*`, `attn.q[0, 4)`, `linears`, `lm_head`, "
                "`re:<regex>`, exact names). Default: every block linear (embeddings, lm_head, norms stay dense).")
EXCLUDE_HELP = "Selectors of tensors to leave dense (applied after include)."


class Pruned(Apply):
    """An ``Apply`` whose result is a pruned version of ``dense`` (kept so PERP's reconstruction mode can find the
    dense weights of a prune step earlier in the same run)."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[Node], *, dense: Node, label: str,
                 host_fn: Callable[..., HostArray] | None = None, stream_fn: Callable | None = None):
        super().__init__(fn, inputs, label=label, shape=dense.shape, dtype=dense.dtype, host_fn=host_fn,
                         stream_fn=stream_fn)
        self.dense = dense


class Fresh(Node):
    """Evaluates ``inner`` with a private executor, so the outer executor sees no edge into ``inner``.

    A global reduction reads every selected tensor once more; if it consumed the same nodes as the prune nodes
    do, the shared executor would cache each one (more than one consumer) and hold the whole model. Wrapping
    the reduction's inputs recomputes them instead (for a plain source tensor: reads it again)."""

    def __init__(self, inner: Node):
        self.inner = inner
        self.inputs = ()
        self.shape = inner.shape
        self.dtype = inner.dtype
        self.label = f"fresh({inner.label})"

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return Executor([self.inner]).evaluate_all()[0]


class Mapped(Node):
    """A source tensor as a torch view of its file's map, read by a reduction (as :class:`Fresh`: no graph edge):
    no copy into an aligned buffer and no NaN/Inf pass, for reductions that only look at values one by one and
    refuse NaN/Inf themselves. Other nodes fall back to :class:`Fresh` (:func:`read_again`)."""

    def __init__(self, inner: Load):
        self.inner = inner
        self.inputs = ()
        self.shape = inner.shape
        self.dtype = inner.dtype_name
        self.label = f"mapped({inner.name})"

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        raw = self.inner.checkpoint.load_host(self.inner.name, check=False)
        t = torch.from_numpy(raw.data.reshape(-1))
        return (t.view(torch.bfloat16) if raw.dtype == "bfloat16" else t).reshape(self.shape)


def read_again(node: Node) -> Node:
    """``node`` read once more by a reduction without an edge into it: the map of an untouched safetensors
    source (:class:`Mapped`), else a private evaluation (:class:`Fresh`)."""
    if isinstance(node, Load) and node.checkpoint.pickle_state is None:
        return Mapped(node)
    return Fresh(node)


ARCH_HELP = "Architecture role overrides for a family surgeon does not know (the recipe's `arch:` mapping)."


def roles(graph: Graph, arch: dict[str, Any] | None = None, *, ctx: Context | None = None) -> Roles:
    """The roles of ``graph``: the run's ``arch:`` (``ctx``) and then the op's own ``arch`` overrides applied.
    (``ctx=None`` reads the op's overrides only; kept for callers that do not pass their context yet.)"""
    if ctx is not None:
        return ctx.roles(graph, overrides=arch)
    from surgeon.arch import roles_for

    return roles_for(graph.config, graph.names(), arch)


def prune_targets(graph: Graph, include: list[str] | None, exclude: list[str] | None,
                  arch: dict[str, Any] | None = None, *, ctx: Context | None = None) -> list[str]:
    """Resolve include/exclude selectors to 2-D weight names in model order (default: all block linears)."""
    r = roles(graph, arch, ctx=ctx)
    if include:
        chosen = r.select(include)
    else:
        chosen = [n for i in range(r.n_layers) for n in r.block_linears(i)]
    if exclude:
        drop = set(r.select(exclude))
        chosen = [n for n in chosen if n not in drop]
    bad = [n for n in chosen if len(graph[n].shape) != 2 or not graph[n].dtype.is_floating_point]
    if bad:
        raise SurgeonError(f"prune: {bad[0]!r} is not a 2-D floating-point weight (shape {list(graph[bad[0]].shape)});"
                           " select matrices only (e.g. exclude norms and biases)")
    if not chosen:
        raise SurgeonError("prune: no tensors selected")
    return chosen


def transposed_names(graph: Graph, names: Sequence[str], arch: dict[str, Any] | None = None, *,
                     ctx: Context | None = None) -> set[str]:
    """Names stored as [d_in, d_out] (GPT-2 Conv1D), from the architecture's roles."""
    r = roles(graph, arch, ctx=ctx)
    out: set[str] = set()
    wanted = set(names)
    for i in range(r.n_layers):
        for role in r.roles():
            if r.transposed(role) and r.has(i, role):
                name = r.tensor(i, role)
                if name in wanted:
                    out.add(name)
    return out


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive inputs."""
    if text is None:
        return None
    try:
        n_s, m_s = str(text).split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"nm: expected 'N:M' like '2:4', got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"nm: need 0 < N < M, got {text!r}")
    return n, m


def _valid_nm(text: str | None) -> str | None:
    parse_nm(text)
    return text


#: an optional ``"N:M"`` option, checked by :func:`parse_nm` when given
NmPattern = Annotated[str | None, AfterValidator(_valid_nm)]


def check_sparsity_matches_nm(sparsity: float, nm_text: str | None, sparsity_given: bool) -> None:
    """A sparsity given next to an N:M pattern must be the one the pattern implies (1 − N/M)."""
    nm = parse_nm(nm_text)
    if nm is None or not sparsity_given:
        return
    implied = 1 - nm[0] / nm[1]
    if abs(sparsity - implied) > 1e-9:
        raise ValueError(f"sparsity={sparsity} contradicts nm={nm_text} (which means {implied:g}); give one of them")


class CalibratedPruneParams(BaseModel):
    """The options the calibrated pruners (Wanda, SparseGPT) share: calibration text, target sparsity or N:M
    pattern (one of them), and which tensors to prune. Each op restates ``sparsity``/``nm`` to say per what."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("model:32", description="Calibration text: a .txt/.jsonl file, a datasets folder, or "
                      "'model:N' (N sequences sampled from the model itself).")
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of weights set to zero.")
    nm: NmPattern = Field(None, description="Semi-structured N:M pattern instead of a sparsity, e.g. '2:4'.")
    seqlen: int = Field(512, ge=2, le=2048, description="Tokens per calibration window (capped by the model's "
                        "context; at most 2048 so long-context models do not hang).")
    n_windows: int = Field(64, ge=1, le=4096, description="Number of calibration windows (the reference uses 128).")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during calibration.")
    include: list[str] | None = Field(None, description=INCLUDE_HELP)
    exclude: list[str] = Field(default_factory=list, description=EXCLUDE_HELP)
    arch: dict[str, Any] | None = Field(None, description=ARCH_HELP)

    @model_validator(mode="after")
    def _consistent(self) -> CalibratedPruneParams:
        check_sparsity_matches_nm(self.sparsity, self.nm, "sparsity" in self.model_fields_set)
        return self


def check_nm_shapes(graph: Graph, names: Sequence[str], m: int, transposed: set[str]) -> None:
    for name in names:
        d_in = graph[name].shape[0] if name in transposed else graph[name].shape[1]
        if d_in % m:
            raise SurgeonError(f"nm: {name!r} has {d_in} inputs, not a multiple of M={m}")


def nm_prune(w: torch.Tensor, n: int, m: int, *, transposed: bool = False,
             score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` largest (by ``score``, default ``|w|``) of every ``m`` consecutive inputs of each output row;
    the ``m - n`` others become zero (ties: the lower input index is zeroed first). fp32 out."""
    wf = w.float()
    if transposed:  # Conv1D stores [d_in, d_out]: groups run along dim 0
        wf = wf.T
        score = None if score is None else score.T
    rows, cols = wf.shape
    s = (wf.abs() if score is None else score.float()).reshape(rows, cols // m, m)
    order = torch.sort(s, dim=-1, stable=True).indices[..., : m - n]
    out = wf.reshape(rows, cols // m, m).scatter(-1, order, 0.0).reshape(rows, cols)
    return out.T.contiguous() if transposed else out


def sparsity_facts(per_tensor: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Report fields from ``{name: (zeros, numel)}``: per-tensor and overall sparsity, tensors above 95 %."""
    zeros = sum(z for z, _ in per_tensor.values())
    total = sum(n for _, n in per_tensor.values())
    return {
        "sparsity": round(zeros / total, 6) if total else 0.0,
        "pruned_tensors": len(per_tensor),
        "pruned_parameters": total,
        "sparsity_per_tensor": {k: round(z / n, 6) for k, (z, n) in per_tensor.items()},
        "above_95_percent": [k for k, (z, n) in per_tensor.items() if n and z / n > 0.95],
    }
