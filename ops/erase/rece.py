"""Concept erasure in the cross-attention of text-to-image diffusion: UCE (closed form) and RECE (iterated).

UCE: Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024, arXiv 2308.14761.
RECE: Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models", ECCV 2024,
arXiv 2407.12383. Reference sheet: ALGORITHMS.md §5.

Only the UNet's ``attn2.to_k`` / ``attn2.to_v`` weights change (32 matrices for SD1.x/2.x, 140 for SDXL); every
other tensor stays a ``Load`` node and is copied byte for byte. The edit of every matrix is ``W ↦ W·M`` with one
d×d matrix M (see :mod:`.closed_form`), so the weights are read twice (once for H = Σ WᵀW, once to apply M)
and all iterations are d×d algebra in float64.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph, LowRank
from surgeon.registry import register

from .closed_form import (
    F64,
    GramAccumulator,
    lowrank_spectral_norm,
    rece_epochs,
    square_root_gram,
    square_root_rows,
    uce_delta_factors,
)
from .sd_keys import SDLayout, detect_layout

#: ALGORITHMS.md §5.4. The I2P categories are RECE's "unsafe" list (train.py, concepts "i2p").
I2P_CONCEPTS = ["hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual", "nudity",
                "bodily fluids", "blood"]
ART_TEMPLATES = ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"]
OBJECT_TEMPLATES = ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"]
HARD_OBJECTS = {"church", "garbage truck"}  # RECE used λ_r = 1e-3 for these, 0.1 for the "easy" objects
#: the artist preset's preserve set: every artist of this list except the erased ones (RECE/UCE code)
ARTISTS_FILE = "artists1734.txt"
OTHER_ARTISTS = "<other artists>"


def artist_list() -> list[str]:
    """The 1,734 artists of RECE's ``dataset/artists1734_prompts.csv`` (shipped as ``surgeon/assets``)."""
    from importlib.resources import files

    text = (files("surgeon") / "assets" / ARTISTS_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def other_artists(concepts: list[str]) -> list[str]:
    """The reference's artist preserve list: the shipped artists whose lower-cased name is not an erased concept."""
    erased = {c.lower() for c in concepts}
    return [a for a in artist_list() if a.lower() not in erased]

PRESETS: dict[str, dict] = {
    "nudity": {"concept": ["nudity"], "target": [" "], "preserve": [], "regularizer": 0.1, "epochs": 3,
               "templates": []},
    "unsafe": {"concept": I2P_CONCEPTS, "target": [" "], "preserve": [], "regularizer": 0.1, "epochs": 2,
               "templates": []},
    "artist": {"concept": [], "target": ["art"], "preserve": [OTHER_ARTISTS], "regularizer": 1e-3, "epochs": 1,
               "templates": ART_TEMPLATES},
    "object": {"concept": [], "target": [" "], "preserve": [], "regularizer": 0.1, "epochs": 1,
               "templates": OBJECT_TEMPLATES},
}
GENERIC = {"target": [" "], "preserve": [], "regularizer": 0.1, "epochs": 3, "templates": []}


class UceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["nudity", "unsafe", "artist", "object"] | None = Field(
        None, description="Defaults from ALGORITHMS.md §5.4: nudity (erase 'nudity' towards ' ', 3 RECE epochs, "
        "λ_r 0.1), unsafe (11 I2P categories, 2 epochs), artist (towards 'art', λ_r 1e-3, 1 epoch; give the "
        "artists as --concept; preserves the other 1,733 artists of RECE's list, as its code), object (towards "
        "' ', 1 epoch). Every value below overrides the preset.")
    concept: list[str] = Field(default_factory=list, description="Concept prompt(s) to erase, e.g. nudity or "
                               "'Van Gogh'. Required unless the preset names them (nudity, unsafe).")
    target: list[str] | None = Field(None, description="Guide prompt(s) the erased concepts are mapped to: one for "
                                     "all, or one per concept. Default ' ' (unconditional); '' is read as ' ' as in "
                                     "the UCE code.")
    preserve: list[str] | None = Field(None, description="Prompts whose keys and values are kept (all 77 positions "
                                       "each). The empty prompt '' is always preserved in the UCE step. Default: "
                                       "the preset's (artist: the other artists of RECE's list; others: none).")
    templates: bool = Field(False, description="Also erase the preset's templated prompts ('painting by X', ... for "
                            "artist; 'photo of X', ... for object) in the UCE step, as UCE's --add_prompts. RECE "
                            "epochs still attack the bare concepts (as RECE's code) unless --attack-templates.")
    positions: Literal["uce2023", "last", "all"] = Field(
        "uce2023", description="Token positions of the UCE step: uce2023 = from the concept's last word token to "
        "the end, aligned with the target's (2023 UCE code); last = the last word token only (2025 rewrite); "
        "all = all 77 positions.")
    uce_lambda: float = Field(0.5, gt=0, description="λ of the UCE step: weight of ‖W′ − W‖² (larger = smaller "
                              "edit).")
    erase_scale: float = Field(1.0, gt=0, description="η_e of the UCE step: weight of the erase term.")
    preserve_scale: float | None = Field(None, gt=0, description="η_p of the UCE step; default max(0.1, "
                                         "1/len(retain)) with retain = [''] + preserve (UCE code).")
    tokenizer: str | None = Field(None, description="Single-file checkpoints only (they carry no tokenizer): a "
                                  "diffusers pipeline folder or a CLIP tokenizer folder. Default: "
                                  "openai/clip-vit-large-patch14 from the local Hub cache.")
    matmul_dtype: Literal["auto", "float32", "float64"] = Field(
        "auto", description="Dtype of the two weight-sized products (Σ WᵀW and W·M), summed in float64 across "
        "blocks of 8192 rows. auto: float32 (float64 for float64 checkpoints); on SD1.4 shapes float32 products "
        "move a float32 output by < 1e-6 of the update and take half the time. All d×d algebra is float64.")

    @field_validator("concept", "preserve")
    @classmethod
    def _strip(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [s.strip() for s in v if s.strip()]

    @model_validator(mode="after")
    def _needs_concept(self):
        if not self.concept and self.preset not in ("nudity", "unsafe"):
            raise ValueError("concept: give at least one concept to erase (or --preset nudity / unsafe)")
        return self


class ReceParams(UceParams):
    epochs: int | None = Field(None, ge=0, le=100, description="RECE epochs after the UCE step (preset default; "
                               "3 without a preset). 0 = UCE only.")
    regularizer: float | None = Field(None, gt=0, description="λ_r of the adversarial embedding, weight of ‖c′‖² "
                                      "(preset default; 0.1 without one).")
    rece_lambda: float = Field(0.1, gt=0, description="λ of each RECE edit (RECE code: 0.1).")
    rece_erase_scale: float = Field(1.0, gt=0, description="η_e of each RECE edit.")
    rece_preserve_scale: float = Field(0.1, gt=0, description="η_p of each RECE edit; RECE preserves E(' ') once "
                                       "per concept plus --preserve.")
    attack_templates: bool = Field(False, description="With --templates, RECE epochs also attack every templated "
                                   "prompt (6x the adversarial embeddings); default: the bare concepts only, as "
                                   "RECE's code.")


# ---- embeddings --------------------------------------------------------------------------------------------

def resolve_settings(params: UceParams) -> dict:
    """Concepts, targets, preserve list, templates, λ_r and epochs after applying the preset."""
    base = PRESETS[params.preset] if params.preset else GENERIC
    concepts = params.concept or list(base.get("concept", []))
    targets = [t if t.strip() else " " for t in (params.target if params.target is not None else base["target"])]
    if len(targets) not in (1, len(concepts)):
        raise SurgeonError(f"target: give one target or one per concept ({len(concepts)}), got {len(targets)}")
    if len(targets) == 1:
        targets = targets * len(concepts)
    templates = base["templates"] if params.templates else []
    if params.templates and not templates:
        raise SurgeonError("templates: only the artist and object presets have templates")
    erased, guides = [], []
    for c, t in zip(concepts, targets):
        for prompt in [c] + [tpl.format(c) for tpl in templates]:
            erased.append(prompt)
            guides.append(t)
    attack_all = bool(getattr(params, "attack_templates", False))
    if attack_all and not templates:
        raise SurgeonError("attack_templates: needs --templates (there are no templated prompts to attack)")
    attacked, attacked_targets = (erased, guides) if attack_all else (list(concepts), list(targets))
    if params.preserve is not None:
        preserve = list(params.preserve)
    else:
        preserve = [p for name in base["preserve"]
                    for p in (other_artists(concepts) if name == OTHER_ARTISTS else [name])]
    lam_r = getattr(params, "regularizer", None)
    if lam_r is None:
        lam_r = base["regularizer"]
        if params.preset == "object" and all(c.lower() in HARD_OBJECTS for c in concepts):
            lam_r = 1e-3
    epochs = getattr(params, "epochs", None)
    if epochs is None:
        epochs = base["epochs"] if isinstance(params, ReceParams) else 0
    return {"concepts": concepts, "erased": erased, "targets": guides, "attacked": attacked,
            "attacked_targets": attacked_targets, "preserve": preserve, "regularizer": lam_r, "epochs": epochs}


def aligned_rows(hc: torch.Tensor, nc: int, ht: torch.Tensor, nt: int, positions: str) -> tuple[torch.Tensor, ...]:
    """Erased and target rows of one (concept, target) pair; ``nc``/``nt`` are token counts with BOS and EOS.

    uce2023 (2023 UCE code): from each prompt's last word token (index n − 2) to the end, both cut to the length of
    the shorter tail so that positions align; last: that one token; all: every position."""
    L = hc.shape[0]
    ic, it = nc - 2, nt - 2
    if positions == "all":
        return hc, ht
    if positions == "last":
        return hc[ic : ic + 1], ht[it : it + 1]
    far = max(ic, it)
    return hc[ic : L - (far - ic)], ht[it : L - (far - it)]


def erasure_embeddings(encoder, settings: dict, positions: str) -> dict[str, torch.Tensor]:
    """All embeddings the edit needs, each prompt encoded once: UCE rows (C, T, P) and RECE inputs."""
    erased = encoder.encode(settings["erased"])
    for prompt, n in zip(settings["erased"], erased.lengths):
        if n <= 2:
            raise SurgeonError(f"concept {prompt!r}: tokenises to nothing with this checkpoint's tokenizer")
    guides = encoder.encode(settings["targets"])
    C_rows, T_rows = [], []
    for hc, nc, ht, nt in zip(erased.hidden, erased.lengths, guides.hidden, guides.lengths):
        c, t = aligned_rows(hc, nc, ht, nt, positions)
        C_rows.append(c)
        T_rows.append(t)
    preserve = [p for p in settings["preserve"] if p != ""]
    retain = [""] + preserve
    n_concepts = len(settings["concepts"])
    if len(preserve) * encoder.max_length <= encoder.dim:  # few rows: keep them (Woodbury path, exact rows)
        P = encoder.encode(retain).hidden.reshape(-1, encoder.dim)
        rece_P = encoder.encode([" "] * n_concepts + preserve).hidden.reshape(-1, encoder.dim)
    else:  # a long list (artist preset): only PᵀP matters, so encode it once, in batches, into a Gram
        G = encoder.gram(preserve)
        P = square_root_gram(G + encoder.gram([""]))
        rece_P = square_root_gram(G + n_concepts * encoder.gram([" "]))
    attacked = settings.get("attacked", settings["erased"])
    attacked_targets = settings.get("attacked_targets", settings["targets"])
    return {
        "C": torch.cat(C_rows), "T": torch.cat(T_rows), "P": P, "n_retain": len(retain),
        "P_rows": len(retain) * encoder.max_length,
        "concepts_full": encoder.encode(attacked).hidden, "targets_full": encoder.encode(attacked_targets).hidden,
        "rece_P": rece_P,
    }


# ---- weights, stacked ----------------------------------------------------------------------------------------

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
    values = iter(ctx_progress(ctx, graph.values(names), len(names), description))
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
                out.nodes[name] = LowRank(graph[name], delta_cols[rows].cpu(), down.cpu(), label=label)
                dw_norm = float(torch.linalg.vector_norm(delta_cols[rows]))
                dC, dQ = moved[rows, :nc], moved[rows, nc:]
            else:
                new = (w + delta_cols[rows]).to(graph[name].dtype)
                out.nodes[name] = Const(new.cpu(), label=label)
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


# ---- the op --------------------------------------------------------------------------------------------------

def _matmul_dtype(choice: str, dtype: torch.dtype) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    return F64 if dtype == torch.float64 else torch.float32


def _check_dims(graph: Graph, layout: SDLayout, d: int) -> None:
    for k, v in layout.pairs:
        for n in (k, v):
            shape = graph[n].shape
            if len(shape) != 2 or shape[1] != d:
                raise SurgeonError(f"{n}: shape {list(shape)} does not take the text embedding width {d}")
            if not graph[n].dtype.is_floating_point:
                raise SurgeonError(f"{n}: dtype {graph[n].dtype} is not a float dtype")


def prepare_erasure(graph: Graph, params: UceParams, ctx) -> tuple[SDLayout, dict, dict[str, torch.Tensor]]:
    """Layout, resolved settings and every embedding the edit needs (text encoders are freed afterwards)."""
    settings = resolve_settings(params)
    layout = detect_layout(graph, params.tokenizer)
    from .text import PromptEncoder

    encoder = PromptEncoder(graph, layout, device=getattr(ctx, "device", "cpu"), ctx=ctx)
    _check_dims(graph, layout, encoder.dim)
    emb = erasure_embeddings(encoder, settings, params.positions)
    return layout, settings, emb


def erase(graph: Graph, params: UceParams, ctx, *, method: str) -> Graph:
    """UCE step, then RECE epochs (``settings['epochs']`` of them), then ``W ← W·M`` for every k/v matrix."""
    clock = _Clock()
    device = getattr(ctx, "device", "cpu")
    layout, settings, emb = prepare_erasure(graph, params, ctx)
    d = emb["C"].shape[1]
    clock.lap("encode")

    # UCE step (eq. 7): one Δ for every matrix
    eta_p = params.preserve_scale or max(0.1, 1 / emb["n_retain"])
    L, R = uce_delta_factors(emb["C"], emb["T"], emb["P"], lam=params.uce_lambda, eta_e=params.erase_scale,
                             eta_p=eta_p, device=device)
    clock.lap("uce")

    names = [n for pair in layout.pairs for n in pair]
    mm_dtype = _matmul_dtype(params.matmul_dtype, graph[names[0]].dtype)
    groups = chunk_plan(graph, names, CHUNK_ROWS)
    keep = sum(math.prod(graph[n].shape) for n in names) * mm_dtype.itemsize <= KEEP_BYTES
    kept: list[WeightChunk] = []
    epochs = settings["epochs"]
    log: list[dict] = []
    adv_norms: list[list[float]] = []
    if epochs:
        acc = GramAccumulator(d, dtype=mm_dtype, device=device)
        for chunk in stacked_weights(graph, groups, mm_dtype, device, ctx, "Σ WᵀW"):
            acc.add(chunk.data)
            if keep:
                kept.append(chunk)
        clock.lap("gram")
        rp = params  # ReceParams here
        res = rece_epochs(None, acc.H.cpu(), emb["concepts_full"], emb["targets_full"], emb["rece_P"], epochs=epochs,
                          lam_r=settings["regularizer"], lam=rp.rece_lambda, eta_e=rp.rece_erase_scale,
                          eta_p=rp.rece_preserve_scale, factors=(L, R), device=device)
        L, R = res.L, res.R
        log = [e.as_dict() for e in res.log]
        adv_norms = [e.adversarial_norm for e in res.log]
        clock.lap("rece_epochs")

    chunks = kept if kept else stacked_weights(graph, groups, mm_dtype, device, ctx, "W·M")
    out, per_matrix = apply_edit(graph, chunks, L, R, emb, mm_dtype=mm_dtype, device=device, label=method)
    del kept, chunks
    low_rank = writes_low_rank(L.shape[1], d)
    C = emb["C"]
    k_minus_i = lowrank_spectral_norm(L, R)
    clock.lap("apply")

    summary = {
        "method": method,
        "layout": layout.kind + (" (SDXL)" if layout.is_sdxl else ""),
        "concepts": settings["concepts"],
        "erased_prompts": settings["erased"],
        "targets": settings["targets"],
        "preserve": settings["preserve"],
        "positions": params.positions,
        "matrices": len(names),
        "embedding_dim": d,
        "uce": {"lambda": params.uce_lambda, "erase_scale": params.erase_scale, "preserve_scale": eta_p,
                "rows_erased": int(C.shape[0]), "rows_preserved": int(emb["P_rows"])},
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
        "edit_rank": int(L.shape[1]) if low_rank else d,
        "written_as": "low-rank" if low_rank else "dense",
        "k_minus_identity": round(k_minus_i, 6),
        "max_relative_change": round(max(m["relative_change"] for m in per_matrix), 6),
        "max_erase_residual": round(max(m["erase_residual"] for m in per_matrix), 6),
        "max_preserve_drift": round(max(m["preserve_drift"] for m in per_matrix), 6),
        "timings_s": clock.wall,
        "cpu_s": clock.cpu,  # process CPU time (all threads): robust to a loaded machine
    }
    if isinstance(params, ReceParams):
        summary["rece"] = {"epochs": epochs, "regularizer": settings["regularizer"], "lambda": params.rece_lambda,
                           "erase_scale": params.rece_erase_scale, "preserve_scale": params.rece_preserve_scale,
                           "log": log}
    # timings go to surgeon.json (via ctx.report) only: the log file must be byte-identical across runs
    record = dict({k: v for k, v in summary.items() if k not in ("timings_s", "cpu_s")},
                  per_matrix=[{k: (round(v, 8) if isinstance(v, float) else v) for k, v in m.items()}
                              for m in per_matrix])
    out.extra_files[f"{method.split('.')[-1]}.json"] = json.dumps(record, indent=2) + "\n"
    out.tags = list(dict.fromkeys(out.tags + ["concept-erasure", method.split(".")[-1]]))
    report = {k: v for k, v in summary.items() if k not in ("erased_prompts", "rece")}
    if log:
        report["rece_epochs"] = [{k: e[k] for k in ("epoch", "regeneration_before", "regeneration_after",
                                                    "target_residual", "preserve_drift", "delta_norm")} for e in log]
        report["adversarial_norms"] = adv_norms
    if hasattr(ctx, "report"):
        ctx.report(**report)
    if not math.isfinite(k_minus_i):
        raise SurgeonError(f"{method}: the edit is not finite (‖M − I‖ = {k_minus_i}); lower the scales")
    return out


class _Clock:
    """Wall and process-CPU seconds per phase, plus totals."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._w0 = self._w = time.perf_counter()
        self._c0 = self._c = time.process_time()

    def lap(self, name: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = round(w - self._w, 4), round(c - self._c, 4)
        self.wall["total"], self.cpu["total"] = round(w - self._w0, 4), round(c - self._c0, 4)
        self._w, self._c = w, c


def ctx_progress(ctx, items, total: int, description: str):
    return ctx.progress(items, total=total, description=description) if hasattr(ctx, "progress") else items


@register("erase.rece", ReceParams, model_level=True)
def apply(graph: Graph, params: ReceParams, ctx) -> Graph:
    """RECE: UCE, then epochs of (closed-form adversarial embedding, re-erase it)."""
    return erase(graph, params, ctx, method="erase.rece")


@register("erase.uce", UceParams, model_level=True)
def apply_uce(graph: Graph, params: UceParams, ctx) -> Graph:
    """UCE closed-form erasure of concepts in every cross-attention key/value projection."""
    return erase(graph, params, ctx, method="erase.uce")
