"""Concept erasure in the cross-attention of text-to-image diffusion: ``erase.uce`` and the pipeline that
``erase.rece`` (:mod:`.rece`) extends with its epochs.

UCE: Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024, arXiv 2308.14761. Reference
sheet: ALGORITHMS.md §5. Presets, settings and the embeddings live here; the weight passes in :mod:`.weights`.

Only the UNet's ``attn2.to_k`` / ``attn2.to_v`` weights change (32 matrices for SD1.x/2.x, 140 for SDXL); every
other tensor stays a ``Load`` node and is copied byte for byte. The edit of every matrix is ``W ↦ W·M`` with one
d×d matrix M (see :mod:`.closed_form`), so the weights are read twice (once for H = Σ WᵀW, once to apply M)
and all iterations are d×d algebra in float64.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

from . import weights
from .closed_form import lowrank_spectral_norm, square_root_gram, uce_delta_factors
from .sd_keys import SDLayout, detect_layout
from .weights import (
    WeightChunk,
    apply_edit,
    check_dims,
    chunk_plan,
    matmul_dtype,
    stacked_weights,
    writes_low_rank,
)

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

    def largest_encoding(self) -> int:
        """Prompts the text encoder encodes in its largest call (the dry-run memory estimate): the preserve set
        (the artist preset: the other artists of RECE's list), the erased prompts with their templates, or the
        attacked ones."""
        s = resolve_settings(self)
        return max(len(s["preserve"]), len(s["erased"]), len(s["attacked"]), 1)

    @model_validator(mode="after")
    def _needs_concept(self):
        if not self.concept and self.preset not in ("nudity", "unsafe"):
            raise ValueError("concept: give at least one concept to erase (or --preset nudity / unsafe)")
        return self


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
    epochs = getattr(params, "epochs", 0)  # UCE has none; RECE's None means the preset's
    if epochs is None:
        epochs = base["epochs"]
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


def prepare_erasure(graph: Graph, params: UceParams, ctx) -> tuple[SDLayout, dict, dict[str, torch.Tensor]]:
    """Layout, resolved settings and every embedding the edit needs (text encoders are freed afterwards)."""
    settings = resolve_settings(params)
    layout = detect_layout(graph, ctx, params.tokenizer)
    from .text import PromptEncoder

    encoder = PromptEncoder(graph, layout, device=ctx.device, ctx=ctx)
    check_dims(graph, layout, encoder.dim)
    emb = erasure_embeddings(encoder, settings, params.positions)
    return layout, settings, emb


@dataclass
class WeightPass:
    """The erased matrices and how they are read: names in UNet order, product dtype, row groups, and whether
    the stacked blocks of the first pass are kept for the apply pass."""

    names: list[str]
    dtype: torch.dtype
    groups: list[list[str]]
    keep: bool

    @classmethod
    def plan(cls, graph: Graph, layout: SDLayout, choice: str) -> WeightPass:
        names = [n for pair in layout.pairs for n in pair]
        dtype = matmul_dtype(choice, graph[names[0]].dtype)
        keep = sum(math.prod(graph[n].shape) for n in names) * dtype.itemsize <= weights.KEEP_BYTES
        return cls(names, dtype, chunk_plan(graph, names, weights.CHUNK_ROWS), keep)


@dataclass
class Refined:
    """What a refinement after the UCE step (RECE's epochs) gives back: the new factors of M − I, the weight
    blocks it read (reused by the apply pass), its report and per-epoch log."""

    L: torch.Tensor
    R: torch.Tensor
    kept: list[WeightChunk] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    adversarial_norms: list[list[float]] = field(default_factory=list)


#: a refinement step: (graph, params, ctx, embeddings, settings, weight pass, L, R, clock) -> Refined
Refine = Callable[..., Refined]


def uce_step(emb: dict, params: UceParams, device: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """UCE (eq. 7): one Δ = L·R for every matrix; returns (L, R, η_p)."""
    eta_p = params.preserve_scale or max(0.1, 1 / emb["n_retain"])
    L, R = uce_delta_factors(emb["C"], emb["T"], emb["P"], lam=params.uce_lambda, eta_e=params.erase_scale,
                             eta_p=eta_p, device=device)
    return L, R, eta_p


def erase(graph: Graph, params: UceParams, ctx, *, method: str, refine: Refine | None = None) -> Graph:
    """UCE step, then ``refine`` (RECE epochs), then ``W ← W·M`` for every k/v matrix; the record and report."""
    clock = _Clock()
    device = ctx.device
    layout, settings, emb = prepare_erasure(graph, params, ctx)
    clock.lap("encode")
    L, R, eta_p = uce_step(emb, params, device)
    clock.lap("uce")
    wp = WeightPass.plan(graph, layout, params.matmul_dtype)
    refined = Refined(L, R)
    if refine is not None and settings["epochs"]:
        refined = refine(graph, params, ctx, emb, settings, wp, L, R, clock)
    chunks = refined.kept or stacked_weights(graph, wp.groups, wp.dtype, device, ctx, "W·M")
    out, per_matrix = apply_edit(graph, chunks, refined.L, refined.R, emb, mm_dtype=wp.dtype, device=device,
                                 label=method)
    del chunks
    refined.kept = []
    k_minus_i = lowrank_spectral_norm(refined.L, refined.R)
    clock.lap("apply")
    summary = erase_summary(method, layout, settings, params, emb, wp, refined, eta_p, k_minus_i, per_matrix,
                            clock)
    record_erasure(out, ctx, method, summary, per_matrix, refined)
    if not math.isfinite(k_minus_i):
        raise SurgeonError(f"{method}: the edit is not finite (‖M − I‖ = {k_minus_i}); lower the scales")
    return out


def erase_summary(method: str, layout: SDLayout, settings: dict, params: UceParams, emb: dict, wp: WeightPass,
                  refined: Refined, eta_p: float, k_minus_i: float, per_matrix: list[dict], clock: _Clock
                  ) -> dict[str, Any]:
    d, C, L = emb["C"].shape[1], emb["C"], refined.L
    low_rank = writes_low_rank(L.shape[1], d)
    summary = {
        "method": method,
        "layout": layout.kind + (" (SDXL)" if layout.is_sdxl else ""),
        "concepts": settings["concepts"],
        "erased_prompts": settings["erased"],
        "targets": settings["targets"],
        "preserve": settings["preserve"],
        "positions": params.positions,
        "matrices": len(wp.names),
        "embedding_dim": d,
        "uce": {"lambda": params.uce_lambda, "erase_scale": params.erase_scale, "preserve_scale": eta_p,
                "rows_erased": int(C.shape[0]), "rows_preserved": int(emb["P_rows"])},
        "matmul_dtype": str(wp.dtype).removeprefix("torch."),
        "edit_rank": int(L.shape[1]) if low_rank else d,
        "written_as": "low-rank" if low_rank else "dense",
        "k_minus_identity": round(k_minus_i, 6),
        "max_relative_change": round(max(m["relative_change"] for m in per_matrix), 6),
        "max_erase_residual": round(max(m["erase_residual"] for m in per_matrix), 6),
        "max_preserve_drift": round(max(m["preserve_drift"] for m in per_matrix), 6),
        "timings_s": clock.wall,
        "cpu_s": clock.cpu,  # process CPU time (all threads): robust to a loaded machine
    }
    summary.update(refined.summary)
    return summary


def record_erasure(out: Graph, ctx, method: str, summary: dict, per_matrix: list[dict], refined: Refined) -> None:
    """``<method>.json`` beside the model (byte-identical across runs: no timings), tags, and the step report."""
    record = dict({k: v for k, v in summary.items() if k not in ("timings_s", "cpu_s")},
                  per_matrix=[{k: (round(v, 8) if isinstance(v, float) else v) for k, v in m.items()}
                              for m in per_matrix])
    short = method.split(".")[-1]
    ctx.attach(out, f"{short}.json", json.dumps(record, indent=2) + "\n")
    out.tags = list(dict.fromkeys(out.tags + ["concept-erasure", short]))
    report = {k: v for k, v in summary.items() if k not in ("erased_prompts", "rece")}
    if refined.log:
        report["rece_epochs"] = [{k: e[k] for k in ("epoch", "regeneration_before", "regeneration_after",
                                                    "target_residual", "preserve_drift", "delta_norm")}
                                 for e in refined.log]
        report["adversarial_norms"] = refined.adversarial_norms
    ctx.report(**report)


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




@register("erase.uce", UceParams, model_level=True,
          summary="UCE closed-form concept erasure (Gandikota et al. 2024).")
def apply(graph: Graph, params: UceParams, ctx) -> Graph:
    """UCE closed-form erasure of concepts in every cross-attention key/value projection."""
    return erase(graph, params, ctx, method="erase.uce")
