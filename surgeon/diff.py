"""``surgeon diff A B``: what changed between two checkpoints, per tensor and per layer × role.

Per tensor (streamed, one pair in memory at a time): relative Frobenius change ``‖B − A‖ / ‖A‖``, zeros that are
new in B, the numerical rank of the delta (singular values above ``rank_tol · σ₁``: exact SVD when the smaller
side is at most :data:`EXACT_RANK_MAX`, otherwise a randomized SVD of the top :data:`SKETCH_RANK` values, which
gives the rank when it is below that and a lower bound otherwise), and dtype/shape changes. Per layer: the
relative change of each role's tensor (architecture roles from :mod:`surgeon.arch`), which :func:`plot_diff`
draws as a heatmap.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.graph import Graph

EXACT_RANK_MAX = 1024
SKETCH_RANK = 64


def delta_rank(delta: torch.Tensor, *, rank_tol: float = 1e-3, seed: int = 0) -> tuple[int, bool]:
    """``(rank, exact)`` of a 2-D delta: singular values above ``rank_tol · σ₁``. ``exact`` is False when the
    randomized sketch saw only lower-bound evidence (every sketched value above the threshold)."""
    import torch

    from surgeon.kernels.linalg import randomized_svd

    d = delta.float()
    if d.ndim != 2:
        d = d.reshape(d.shape[0], -1)
    if not torch.any(d):
        return 0, True
    if min(d.shape) <= EXACT_RANK_MAX:
        s = torch.linalg.svdvals(d)
        return int((s > rank_tol * s[0]).sum()), True
    _, s, _ = randomized_svd(d, SKETCH_RANK, seed=seed)
    r = int((s > rank_tol * s[0]).sum())
    return r, r < SKETCH_RANK


def _tensor_diff(a: torch.Tensor, b: torch.Tensor, rank_tol: float) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    if a.dtype != b.dtype:
        out["dtype"] = [str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch.")]
    if a.shape != b.shape:
        out["status"] = "shape"
        out["shape"] = [list(a.shape), list(b.shape)]
        return out
    if not (a.is_floating_point() and b.is_floating_point()):
        out["status"] = "same" if torch.equal(a, b) else "changed"
        return out
    af, bf = a.double(), b.double()
    delta = bf - af
    dn = float(torch.linalg.vector_norm(delta))
    an = float(torch.linalg.vector_norm(af))
    out["status"] = "same" if dn == 0 else "changed"
    out["rel_change"] = dn / an if an > 0 else (0.0 if dn == 0 else None)  # None: A is all zeros
    out["abs_change"] = dn
    out["new_zeros"] = int(((b == 0) & (a != 0)).sum())
    out["zeros_b"] = int((b == 0).sum())
    out["numel"] = a.numel()
    if a.ndim >= 2 and dn > 0:
        r, exact = delta_rank(delta, rank_tol=rank_tol)
        out["delta_rank"] = r
        out["rank_exact"] = exact
    elif a.ndim >= 2:
        out["delta_rank"] = 0
        out["rank_exact"] = True
    return out


def diff_checkpoints(a: Graph, b: Graph, *, rank_tol: float = 1e-3, progress=None) -> dict[str, Any]:
    """Compare graph ``b`` against graph ``a`` (the reference). Returns a JSON-ready dict:

    ``tensors``: name -> {status (same|changed|shape|only_a|only_b), rel_change, abs_change, new_zeros, zeros_b,
    numel, delta_rank, rank_exact, dtype [a, b], shape [a, b]}; ``layers``: {family, roles, rows: [[rel change or
    None per role] per layer]} or None when the architecture is unknown; ``summary``: counts and the largest
    changes; ``config_changes``: top-level config keys whose values differ.
    """
    if rank_tol <= 0:
        raise SurgeonError(f"rank_tol {rank_tol}: expected a positive tolerance")
    names_a, names_b = a.names(), set(b.names())
    both = [n for n in names_a if n in names_b]
    tensors: dict[str, dict[str, Any]] = {}
    for n in names_a:
        if n not in names_b:
            tensors[n] = {"status": "only_a", "shape": [list(a[n].shape), None]}
    for n in b.names():
        if n not in set(names_a):
            tensors[n] = {"status": "only_b", "shape": [None, list(b[n].shape)]}
    pairs = zip(a.values(both), b.values(both))
    it = progress(pairs, len(both), "diff") if progress is not None else pairs
    for (name, va), (_, vb) in it:
        tensors[name] = _tensor_diff(va, vb, rank_tol)
        del va, vb
    ordered = {n: tensors[n] for n in [*names_a, *[n for n in b.names() if n not in set(names_a)]]}

    counts: dict[str, int] = {}
    for t in ordered.values():
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    changed = sorted(((t.get("rel_change") if t.get("rel_change") is not None else math.inf, n)
                      for n, t in ordered.items() if t["status"] == "changed"), reverse=True)
    summary = {"tensors": len(ordered), **{f"n_{k}": v for k, v in sorted(counts.items())},
               "new_zeros": sum(t.get("new_zeros", 0) for t in ordered.values()),
               "largest_changes": [{"name": n, "rel_change": r if math.isfinite(r) else None}
                                   for r, n in changed[:10]]}
    cfg_a, cfg_b = a.config, b.config
    config_changes = {k: [cfg_a.get(k), cfg_b.get(k)] for k in sorted(set(cfg_a) | set(cfg_b))
                      if cfg_a.get(k) != cfg_b.get(k) and not k.startswith("_")}
    return {"tensors": ordered, "layers": _per_layer(a, ordered), "summary": summary,
            "config_changes": config_changes, "rank_tol": rank_tol}


def _per_layer(a: Graph, tensors: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    from surgeon.arch import roles_for

    cfg = a.config
    if not cfg and "unet" in a.configs:
        cfg = a.configs["unet"]
    try:
        r = roles_for(cfg, a.names())
    except SurgeonError as e:
        return {"error": str(e)}
    roles = [role for role in r.roles() if any(r.has(i, role) for i in range(r.n_layers))]
    rows = []
    for i in range(r.n_layers):
        row = []
        for role in roles:
            name = r._lookup(i, role)
            t = tensors.get(name) if name else None
            row.append(t.get("rel_change") if t else None)
        rows.append(row)
    return {"family": r.family, "roles": roles, "layer_prefixes": r.prefixes, "rows": rows}


def check_plot_target(path: str | Path) -> Path:
    """Refuse a ``--plot`` path that cannot be written before the (long) diff runs: a missing or read-only
    folder, a folder given as the file, no matplotlib. Returns the absolute path."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise SurgeonError(f"--plot {path}: is a folder; give a file name such as {Path(path) / 'diff.png'}")
    if not p.parent.is_dir():
        raise SurgeonError(f"--plot {path}: folder {p.parent} does not exist (create it first)")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise SurgeonError(f"--plot {path}: folder {p.parent} is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SurgeonError("--plot needs matplotlib (pip install 'surgeon[plot]')") from None
    return p


UNCHANGED_RGBA = (1.0, 1.0, 1.0, 1.0)  # white: exactly unchanged
MISSING_RGBA = (0.867, 0.867, 0.867, 1.0)  # grey: the role has no tensor in that layer


def heatmap_colours(data: Any) -> tuple[Any, Any, Any]:
    """RGBA per cell of ``data`` [layers, roles] (relative changes, NaN = missing): viridis on a log scale from
    the smallest to the largest change; unchanged (exactly 0) white and missing grey, both outside the scale,
    so an unchanged cell never looks like a small change. Returns ``(rgba, cmap, norm)`` for the colour bar."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm

    positive = data[np.isfinite(data) & (data > 0)]
    lo = float(positive.min()) if positive.size else 1e-8
    hi = float(positive.max()) if positive.size else 1.0
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    cmap = matplotlib.colormaps["viridis"]
    rgba = np.empty((*data.shape, 4))
    changed = np.isfinite(data) & (data > 0)
    rgba[changed] = cmap(norm(data[changed]))
    rgba[data == 0] = UNCHANGED_RGBA
    rgba[~np.isfinite(data)] = MISSING_RGBA
    return rgba, cmap, norm


def plot_diff(result: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of the relative change per layer (rows) × role (columns), log colour scale, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.cm import ScalarMappable
    except ImportError:
        raise SurgeonError("--plot needs matplotlib (pip install 'surgeon[plot]')") from None
    import numpy as np

    layers = result.get("layers")
    if not layers or "rows" not in layers:
        why = layers.get("error") if isinstance(layers, dict) else "no per-layer summary"
        raise SurgeonError(f"--plot: cannot draw layers × roles ({why})")
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in layers["rows"]], dtype=float)
    rgba, cmap, norm = heatmap_colours(data)
    fig_h = max(3.0, 0.22 * data.shape[0] + 1.5)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * data.shape[1] + 2.5), fig_h))
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(layers["roles"])), layers["roles"], rotation=45, ha="right")
    n_layers = data.shape[0]
    step = max(1, math.ceil(n_layers / 40))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_ylabel("layer")
    ax.set_title(f"relative change ‖B − A‖/‖A‖ ({layers['family']}; white: unchanged, grey: missing)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.2e}" if v < 1e-2 or v >= 100 else f"{v:.3f}"


def _short_role(role: str) -> str:
    """Column label: ``attn.q`` -> ``q``, ``mlp.down`` -> ``down``, ``norm.attn`` -> ``n.attn``, ``xattn.k`` -> ``x.k``."""
    fam, _, part = role.partition(".")
    return {"attn": part, "mlp": part, "norm": f"n.{part}", "xattn": f"x.{part}"}.get(fam, role)


def render_diff(result: dict[str, Any], *, console=None, max_rows: int = 40) -> None:
    """Print the diff for a person on stderr: summary, the changed tensors (largest first), layers × roles."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    s = result["summary"]
    counts = ", ".join(f"{k.removeprefix('n_')} {v}" for k, v in s.items() if k.startswith("n_"))
    console.print(f"[bold]{s['tensors']} tensors[/bold]: {counts}; new zeros {s['new_zeros']}")
    rows = [(n, t) for n, t in result["tensors"].items() if t["status"] != "same"]
    rows.sort(key=lambda nt: -(nt[1].get("rel_change") if nt[1].get("rel_change") is not None else math.inf))
    if rows:
        table = Table(title="changed tensors", header_style="bold")
        show_extra = any("dtype" in t or "shape" in t for _, t in rows[:max_rows])
        table.add_column("tensor", overflow="fold", ratio=3)
        for col in ("status", "rel change", "new zeros", "delta rank"):
            table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
        if show_extra:
            table.add_column("dtype / shape", overflow="fold", ratio=1)
        for name, t in rows[:max_rows]:
            rank = t.get("delta_rank")
            rank_s = "-" if rank is None else (str(rank) if t.get("rank_exact", True) else f">={rank}")
            extra = " → ".join(map(str, t["dtype"])) if "dtype" in t else ""
            if "shape" in t:
                extra = (extra + " " if extra else "") + " → ".join(map(str, t["shape"]))
            cells = [name, t["status"], _fmt(t.get("rel_change")), str(t.get("new_zeros", "-")), rank_s]
            table.add_row(*cells, *([extra] if show_extra else []))
        if len(rows) > max_rows:
            table.caption = f"{len(rows) - max_rows} more changed tensors not shown (use --json)"
        console.print(table)
    layers = result.get("layers")
    if isinstance(layers, dict) and "rows" in layers and any(
            v for row in layers["rows"] for v in row if v is not None):
        table = Table(title=f"relative change per layer × role ({layers['family']})", header_style="bold",
                      padding=(0, 1), box=None)
        table.add_column("layer", justify="right")
        for role in layers["roles"]:
            table.add_column(_short_role(role), justify="right", no_wrap=True)
        for i, row in enumerate(layers["rows"]):
            table.add_row(str(i), *[_fmt(v) for v in row])
        console.print(table)
    if result.get("config_changes"):
        console.print("config changes: " + ", ".join(f"{k}: {a!r} → {b!r}"
                                                     for k, (a, b) in result["config_changes"].items()))
