"""The erased k/v matrices as stacked row blocks: the Gram pass (Σ WᵀW) and the apply pass (W ← W + W·(M − I)) of
``erase.uce`` and ``erase.rece`` each multiply ``[≤ CHUNK_ROWS, d]`` blocks, so memory stays bounded."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph, LowRank

from .closed_form import F64, square_root_rows
from .sd_keys import SDLayout

#: rows of stacked weights per product: the Gram and the apply pass multiply [≤ CHUNK_ROWS, d] blocks, so a
#: product has a long inner dimension even when a matrix has 320 rows, and memory stays bounded
CHUNK_ROWS = 8192
#: stacked weights up to this size (in the product dtype) are kept from the Gram pass for the apply pass
KEEP_BYTES = 512 * 2**20


@dataclass
class WeightChunk:
    names: list[str]
    rows: list[int]
    data: torch.Tensor  # the matrices stacked along their rows, [Σ rows, d], in the product dtype


def chunk_plan(graph: Graph, names: list[str], max_rows: int) -> list[list[str]]:
    """Consecutive groups of matrices with at most ``max_rows`` rows together (or one matrix, if larger)."""
    groups: list[list[str]] = []
    rows = 0
    for n in names:
        o = graph[n].shape[0]
        if not groups or rows + o > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(n)
        rows += o
    return groups


def stacked_weights(graph: Graph, groups: list[list[str]], dtype: torch.dtype, device: str, ctx,
                    description: str) -> Iterator[WeightChunk]:
    """Each group's matrices converted straight into one ``[Σ rows, d]`` buffer (one copy per weight)."""
    names = [n for g in groups for n in g]
    values = iter(progress(ctx, graph.values(names), len(names), description))
    for group in groups:
        rows = [graph[n].shape[0] for n in group]
        data = torch.empty(sum(rows), graph[group[0]].shape[1], dtype=dtype, device=device)
        at = 0
        for o in rows:
            data[at : at + o].copy_(next(values)[1])
            at += o
        yield WeightChunk(group, rows, data)
    for _ in values:  # let the progress bar finish
        pass


def writes_low_rank(rank: int, d: int) -> bool:
    """A rank-r edit of d-wide matrices is written as W + (W·L′)·R′ when that is cheaper than W·M (2r < d)."""
    return 2 * rank < d


def apply_edit(graph: Graph, chunks: Iterable[WeightChunk], L: torch.Tensor, R: torch.Tensor, emb: dict, *,
               mm_dtype: torch.dtype, device: str, label: str) -> tuple[Graph, list[dict]]:
    """W ← W + W·(M − I) for every matrix, with its per-matrix report, one product per chunk.

    M − I = L·R has rank r ≤ rows erased. Below d/2 the edit is a LowRank node W + (W·L′)·R′ (2·o·d·r flops
    instead of o·d², summed when written), with R′ = Qᵀ from Rᵀ = Q·Tr so that ‖ΔW‖_F = ‖W·L′‖_F; else a dense
    Const. The report rows ride in the same product: W(c − t) for the erased rows and W·qᵀ for preserved rows in
    an exact square-root form with at most d rows (‖ΔW·Pᵀ‖ = ‖ΔW·Qᵀ‖ for QᵀQ = PᵀP)."""
    d = L.shape[0]
    low_rank = writes_low_rank(L.shape[1], d)
    C = emb["C"].to(F64)
    Q = square_root_rows(emb["P"])
    if low_rank:
        basis, tri = torch.linalg.qr(R.T)
        edit, down = L @ tri.T, basis.T.contiguous()
        CR, QR = (C @ basis).to(mm_dtype), (Q @ basis).to(mm_dtype)
    else:
        edit, down = L @ R, None
    k, nc = edit.shape[1], C.shape[0]
    cols = [edit, (C - emb["T"].to(F64)).T, Q.T]
    width = sum(c.shape[1] for c in cols)
    cols.append(edit.new_zeros(d, -width % 16))  # a multiple of 16 columns: the GEMM runs up to 1.7× faster
    rhs = torch.cat(cols, dim=1).to(device=device, dtype=mm_dtype)
    out = graph.copy()
    per_matrix = []
    for chunk in chunks:
        Y = chunk.data @ rhs
        delta_cols = Y[:, :k].contiguous() if low_rank else Y[:, :k]
        # rows·ΔWᵀ for the report, every matrix of the chunk in one product (low rank: without forming ΔW)
        moved = delta_cols @ torch.cat([CR, QR]).T if low_rank else None
        at = 0
        for name, o in zip(chunk.names, chunk.rows):
            rows = slice(at, at + o)
            at += o
            w, gap, qw = chunk.data[rows], Y[rows, k : k + nc], Y[rows, k + nc : width]
            if low_rank:
                out.replace(name, LowRank(graph[name], delta_cols[rows].cpu(), down.cpu(), label=label))
                dw_norm = float(torch.linalg.vector_norm(delta_cols[rows]))
                dC, dQ = moved[rows, :nc], moved[rows, nc:]
            else:
                new = (w + delta_cols[rows]).to(graph[name].dtype)
                out.replace(name, Const(new.cpu(), label=label))
                dw = new.to(F64) - w.to(F64)  # what is written, after the cast
                dw_norm = float(dw.norm())
                dC, dQ = dw @ C.to(dw).T, dw @ Q.to(dw).T
            per_matrix.append({
                "name": name,
                "relative_change": dw_norm / float(torch.linalg.vector_norm(w).clamp_min(1e-30)),
                "erase_residual": float((gap.to(F64) + dC).norm() / gap.norm().clamp_min(1e-30)),
                "preserve_drift": float(dQ.norm() / qw.norm().clamp_min(1e-30)),
            })
    return out, per_matrix



def matmul_dtype(choice: str, dtype: torch.dtype) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    return F64 if dtype == torch.float64 else torch.float32


def check_dims(graph: Graph, layout: SDLayout, d: int) -> None:
    for k, v in layout.pairs:
        for n in (k, v):
            shape = graph[n].shape
            if len(shape) != 2 or shape[1] != d:
                raise SurgeonError(f"{n}: shape {list(shape)} does not take the text embedding width {d}")
            if not graph[n].dtype.is_floating_point:
                raise SurgeonError(f"{n}: dtype {graph[n].dtype} is not a float dtype")



def progress(ctx, items, total: int, description: str):
    return ctx.progress(items, total=total, description=description) if hasattr(ctx, "progress") else items
