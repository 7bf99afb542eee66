"""The algebra of UCE and RECE, as pure functions of float64 tensors (no models, no files).

Conventions (ALGORITHMS.md §5): a projection W ∈ ℝ^{o×d} acts on a text embedding column c ∈ ℝ^d. Sets of
embeddings are passed as *rows* (``[n, d]``), the way text encoders return them.

UCE (Gandikota et al., arXiv 2308.14761, eq. 7 with the preserve term): for every W,

    W′ = W·K,   K = (λI + η_e TᵀC + η_p PᵀP)(λI + η_e CᵀC + η_p PᵀP)⁻¹        (rows C, T, P)

One K serves every cross-attention matrix because the targets W·t come from the same unedited W ("shared K"). Since
the numerator and denominator differ only in the erase term, ``K − I = η_e (T − C)ᵀ C B⁻¹`` with B the denominator:
we carry Δ = K − I, which has rank ≤ n and keeps float error relative to the change, not to W.

RECE (Gong et al., arXiv 2407.12383, §3.2, "close_regzero" in the authors' code): the embedding that makes the
edited model emit the original keys/values, summed over all L key and value matrices,

    c′ = (λ_r I + Σ_l W′_lᵀW′_l)⁻¹ (Σ_l W′_lᵀW_l) c.

With W′_l = W_l·M (M the product of every K so far) and H = Σ_l W_lᵀW_l computed once, this is
``c′ = (λ_r I + MᵀHM)⁻¹ MᵀH c``: each RECE epoch is d×d algebra and the weights are touched once at the end.

``*_per_matrix`` functions are the independent reference: they follow the authors' per-layer loops literally
(explicit inverses, one matrix at a time) and are used only in tests.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from surgeon.kernels.linalg import cholesky_solve

F64 = torch.float64


def _eye(d: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, dtype=like.dtype, device=like.device)


def uce_normal_matrix(C: torch.Tensor, P: torch.Tensor | None, lam: float, eta_e: float, eta_p: float, *,
                      preserve_gram: torch.Tensor | None = None) -> torch.Tensor:
    """B = λI + η_e CᵀC + η_p PᵀP (the denominator of eq. 7; symmetric positive definite for λ > 0).

    ``preserve_gram`` = PᵀP when already known (RECE reuses it every epoch); then ``P`` is ignored."""
    d = C.shape[1]
    B = lam * _eye(d, C)
    if C.numel():
        B = B + eta_e * (C.T @ C)
    if preserve_gram is not None:
        B = B + eta_p * preserve_gram.to(B)
    elif P is not None and P.numel():
        P = P.to(B)
        B = B + eta_p * (P.T @ P)
    return B


def uce_delta_factors(C: torch.Tensor, T: torch.Tensor, P: torch.Tensor | None, *, lam: float, eta_e: float,
                      eta_p: float, preserve_gram: torch.Tensor | None = None,
                      device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K − I = A·R with A = η_e (T − C)ᵀ ``[d, n]`` and R = C B⁻¹ ``[n, d]`` (float64): rank ≤ n rows erased.

    ``C`` erased embeddings and ``T`` their aligned targets (``[n, d]`` each), ``P`` preserved embeddings ``[m, d]``
    (or their Gram ``preserve_gram`` = PᵀP). With rows (no Gram) and n + m < d, B⁻¹Cᵀ comes from the Woodbury
    identity on the k = n + m stacked rows (k×k algebra instead of a d×d factorisation).
    """
    if C.shape != T.shape:
        raise ValueError(f"erased {list(C.shape)} and target {list(T.shape)} embeddings must align")
    C, T = C.to(F64), T.to(F64)
    d = C.shape[1]
    rows = C.shape[0] + (0 if P is None else P.shape[0])
    if preserve_gram is None and 2 * rows < d:
        X = C * eta_e**0.5 if P is None or not P.numel() else torch.cat([C * eta_e**0.5, P.to(F64) * eta_p**0.5])
        inner = lam * _eye(X.shape[0], X) + X @ X.T
        # B⁻¹Cᵀ = (Cᵀ − Xᵀ (λI + XXᵀ)⁻¹ X Cᵀ) / λ
        Binv_Ct = (C.T - X.T @ cholesky_solve(inner, X @ C.T, device=device)) / lam
    else:
        B = uce_normal_matrix(C, P, lam, eta_e, eta_p, preserve_gram=preserve_gram)
        Binv_Ct = cholesky_solve(B, C.T, device=device)  # B⁻¹Cᵀ  [d, n]
    return eta_e * (T - C).T.to(Binv_Ct), Binv_Ct.T


def gram(weights: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """H = Σ_l W_lᵀW_l in float64 (reference; the op streams this through :class:`GramAccumulator`)."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    H = torch.zeros(ws[0].shape[1], ws[0].shape[1], dtype=F64)
    for w in ws:
        w = w.to(F64)
        H += w.T @ w
    return H


class GramAccumulator:
    """Streams H = Σ WᵀW over matrices with the same input width; products in ``dtype``, the sum in float64.

    H is symmetric, so only the upper blocks of a ``block``-wide column partition are multiplied (the lower ones
    are their transposes): with b blocks this is (b + 1)/(2b) of the flops of ``w.T @ w`` (SD1.x 3/4, SDXL 5/8).
    """

    def __init__(self, d: int, *, dtype: torch.dtype = F64, device: str = "cpu", block: int = 512):
        self.H = torch.zeros(d, d, dtype=F64, device=device)
        self.dtype, self.device = dtype, device
        n = max(1, -(-d // block))
        step = -(-d // n)
        self.cuts = [(i, min(i + step, d)) for i in range(0, d, step)]
        self.count = 0

    def add(self, w: torch.Tensor) -> None:
        w = w.to(device=self.device, dtype=self.dtype)
        if len(self.cuts) == 1:
            self.H += (w.T @ w).to(F64)
        else:
            for i, (a, b) in enumerate(self.cuts):
                wa = w[:, a:b]
                for c, e in self.cuts[i:]:
                    blk = (wa.T @ w[:, c:e]).to(F64)
                    self.H[a:b, c:e] += blk
                    if c != a:
                        self.H[c:e, a:b] += blk.T
        self.count += 1


def weighted_norms(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_l ‖W_l x‖²) = sqrt(xᵀHx) for each row x of ``X`` (all-matrix norms without touching the weights)."""
    return ((X @ H) * X).sum(-1).clamp_min(0).sqrt()


@dataclass
class EpochLog:
    """What one RECE epoch did, all measured through H over every key and value matrix."""

    epoch: int
    adversarial_norm: list[float]  # mean ‖c′‖ over positions, per concept
    concept_norm: list[float]  # mean ‖c‖ over positions, per concept
    regeneration_before: float  # Σ‖W′c′ − Wc‖ / Σ‖Wc‖ before this epoch's edit (small: the concept comes back)
    regeneration_after: float  # the same after the edit
    target_residual: float  # Σ‖W″c′ − W′t‖ / Σ‖W′t‖ after the edit (small: c′ now maps to the target)
    preserve_drift: float  # sqrt(Σ‖W″p − W′p‖² / Σ‖W′p‖²)
    delta_norm: float  # ‖K_e − I‖ (spectral), a collapse signal
    condition: float  # condition number of the epoch's normal matrix B

    def as_dict(self) -> dict[str, object]:
        return {k: (round(v, 8) if isinstance(v, float) else [round(x, 8) for x in v] if isinstance(v, list) else v)
                for k, v in self.__dict__.items()}


@dataclass
class ReceResult:
    M: torch.Tensor  # K_tot = K_UCE·K_1⋯K_e  [d, d] float64
    L: torch.Tensor | None = None  # M − I = L·R when factors were tracked (L [d, r], R [r, d])
    R: torch.Tensor | None = None
    adversarial: list[torch.Tensor] = field(default_factory=list)  # per epoch, [n_concepts, 77, d]
    log: list[EpochLog] = field(default_factory=list)


def lowrank_spectral_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖A·B‖₂ for A ``[d, r]``, B ``[r, d]`` from two thin QR factorisations (no d×d SVD)."""
    if A.shape[1] == 0:
        return 0.0
    ra = torch.linalg.qr(A, mode="r").R
    rb = torch.linalg.qr(B.T, mode="r").R
    return float(torch.linalg.svdvals(ra @ rb.T)[0])


def normal_matrix_condition(C: torch.Tensor, P: torch.Tensor, lam: float, eta_e: float, eta_p: float) -> float:
    """cond(λI + η_e CᵀC + η_p PᵀP): from the small Gram of the stacked rows when they number fewer than d
    (then λ_min = λ exactly), else from the d×d eigenvalues."""
    X = torch.cat([C * eta_e**0.5, P * eta_p**0.5])
    d = X.shape[1]
    if X.shape[0] < d:
        top = float(torch.linalg.eigvalsh(X @ X.T)[-1]) if X.shape[0] else 0.0
        return (lam + top) / lam
    ev = torch.linalg.eigvalsh(lam * _eye(d, X) + X.T @ X)
    return float(ev[-1] / ev[0])


def square_root_rows(P: torch.Tensor) -> torch.Tensor:
    """Rows Q with QᵀQ = PᵀP and at most d of them (P itself when it has ≤ d rows)."""
    P = P.to(F64)
    if P.shape[0] <= P.shape[1]:
        return P
    return square_root_gram(P.T @ P)


def square_root_gram(G: torch.Tensor) -> torch.Tensor:
    """Rows Q (at most d) with QᵀQ = G for a symmetric positive semi-definite ``G`` (eigenvalues below 1e-14 of
    the largest are dropped)."""
    ev, V = torch.linalg.eigh(G.to(F64))
    keep = ev > ev.max() * 1e-14
    return (V[:, keep] * ev[keep].sqrt()).T


def rece_epochs(M0: torch.Tensor | None, H: torch.Tensor, concepts: torch.Tensor, targets: torch.Tensor,
                preserve: torch.Tensor, *, epochs: int, lam_r: float, lam: float, eta_e: float, eta_p: float,
                factors: tuple[torch.Tensor, torch.Tensor] | None = None, device: str = "cpu") -> ReceResult:
    """Run RECE epochs from the UCE edit ``M0`` (= K_UCE), the K-trick way (module docstring).

    ``concepts`` ``[n, L, d]``: E(concept) at every position; ``targets`` ``[n, L, d]``: E(target) aligned with
    them; ``preserve`` ``[m, d]`` rows kept. Each epoch: (a) c′ for every concept position with the current M;
    (b) a UCE step with C = c′, T = targets, P = preserve, values from the current model → K_e; (c) M ← M·K_e.

    ``factors`` (L, R) with M0 − I = L·R are extended as M·K_e − I = [L, M·A_e]·[R; R_e], so the final edit
    can be applied as W + (W·L)·R when its rank r is below d/2. The epochs work on the factors throughout: with
    HL = H·L kept up to date, MᵀHM = H + Y + Yᵀ with Y = (HL + ½RᵀLᵀHL)·R, one d×d×r product per epoch instead
    of two d³ ones. Without ``factors`` they are L = M0 − I, R = I (same algebra at r = d); with them ``M0`` is
    not needed (pass None).
    """
    H = H.to(F64)
    d = H.shape[0]
    C0 = concepts.to(F64).reshape(-1, d)
    T = targets.to(F64).reshape(-1, d)
    Q = square_root_rows(preserve.to(F64).reshape(-1, d))
    eye = _eye(d, H)
    if factors is None:
        L, R = M0.to(F64) - eye, eye.clone()
    else:
        L, R = factors[0].to(F64), factors[1].to(F64)
    HL = H @ L
    c0_norm = weighted_norms(C0, H).sum().clamp_min(1e-300)
    n = concepts.shape[0]
    log: list[EpochLog] = []
    adversarial: list[torch.Tensor] = []
    for e in range(epochs):
        # (a) c′ = (λ_r I + MᵀHM)⁻¹ MᵀH c with M = I + LR
        G = L.T @ HL
        Y = (HL + 0.5 * (R.T @ G)) @ R
        S = lam_r * eye + H + Y + Y.T
        rhs = H @ C0.T + R.T @ (HL.T @ C0.T)
        Cadv = cholesky_solve((S + S.T) / 2, rhs, device=device).T
        # (b) one UCE step on c′; (c) M·K_e = M + (M·A_e)·R_e
        A_e, R_e = uce_delta_factors(Cadv, T, Q, lam=lam, eta_e=eta_e, eta_p=eta_p, device=device)
        MA = A_e + L @ (R @ A_e)
        log.append(_epoch_log(e + 1, Cadv, C0, T, Q, L, R, A_e, MA, R_e, H, c0_norm, concepts, lam, eta_e, eta_p))
        adversarial.append(Cadv.reshape(n, -1, d))
        L, R = torch.cat([L, MA], dim=1), torch.cat([R, R_e], dim=0)
        HL = torch.cat([HL, H @ MA], dim=1)
    tracked = factors is not None
    return ReceResult(eye + L @ R, L if tracked else None, R if tracked else None, adversarial, log)


def _epoch_log(epoch: int, Cadv: torch.Tensor, C0: torch.Tensor, T: torch.Tensor, Q: torch.Tensor, L: torch.Tensor,
               R: torch.Tensor, A_e: torch.Tensor, MA: torch.Tensor, R_e: torch.Tensor, H: torch.Tensor,
               c0_norm: torch.Tensor, concepts: torch.Tensor, lam: float, eta_e: float, eta_p: float) -> EpochLog:
    """The epoch's diagnostics, every all-matrix norm from one product of the stacked rows with H."""
    def by_m(X: torch.Tensor) -> torch.Tensor:  # X·Mᵀ with M = I + LR
        return X + (X @ R.T) @ L.T

    adv_m, t_m, q_m = by_m(Cadv), by_m(T), by_m(Q)
    adv_next = adv_m + (Cadv @ R_e.T) @ MA.T  # X·M_nextᵀ, M_next = M + MA·R_e
    blocks = [adv_m - C0, adv_next - C0, adv_next - t_m, t_m, (Q @ R_e.T) @ MA.T, q_m]
    X = torch.cat(blocks)
    quad = ((X @ H) * X).sum(-1).clamp_min(0)
    parts = quad.split([b.shape[0] for b in blocks])
    norm = [p.sqrt().sum() for p in parts]
    n = concepts.shape[0]
    d = H.shape[0]
    drift_den = float(parts[5].sum())
    return EpochLog(
        epoch=epoch,
        adversarial_norm=Cadv.reshape(n, -1, d).norm(dim=-1).mean(-1).tolist(),
        concept_norm=concepts.to(F64).norm(dim=-1).mean(-1).tolist(),
        regeneration_before=float(norm[0] / c0_norm),
        regeneration_after=float(norm[1] / c0_norm),
        target_residual=float(norm[2] / norm[3].clamp_min(1e-300)),
        preserve_drift=(float(parts[4].sum()) / drift_den) ** 0.5 if drift_den > 0 else 0.0,
        delta_norm=lowrank_spectral_norm(A_e, R_e),
        condition=normal_matrix_condition(Cadv, Q, lam, eta_e, eta_p),
    )


# ---- independent per-matrix reference (the authors' loops, float64; tests only) -------------------------------

def uce_edit_per_matrix(weights: Sequence[torch.Tensor], C: torch.Tensor, T: torch.Tensor, P: torch.Tensor, *,
                        lam: float, eta_e: float, eta_p: float) -> list[torch.Tensor]:
    """W′ = (λW + η_e Σ (Wt)cᵀ + η_p Σ (Wp)pᵀ)(λI + η_e Σ ccᵀ + η_p Σ ppᵀ)⁻¹ per matrix, explicit inverse."""
    out = []
    for w in weights:
        w = w.to(F64)
        d = w.shape[1]
        mat1 = lam * w.clone()
        mat2 = lam * torch.eye(d, dtype=F64)
        for c, t in zip(C.to(F64), T.to(F64)):
            mat1 += eta_e * torch.outer(w @ t, c)
            mat2 += eta_e * torch.outer(c, c)
        for p in P.to(F64):
            mat1 += eta_p * torch.outer(w @ p, p)
            mat2 += eta_p * torch.outer(p, p)
        out.append(mat1 @ torch.linalg.inv(mat2))
    return out


def rece_per_matrix(original: Sequence[torch.Tensor], edited: Sequence[torch.Tensor], concepts: torch.Tensor,
                    targets: torch.Tensor, preserve: torch.Tensor, *, epochs: int, lam_r: float, lam: float,
                    eta_e: float, eta_p: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """RECE epochs on explicit matrices: returns (final edited weights, adversarial rows per epoch)."""
    W0 = [w.to(F64) for w in original]
    W = [w.to(F64) for w in edited]
    d = W0[0].shape[1]
    C0 = concepts.to(F64).reshape(-1, d)
    advs = []
    for _ in range(epochs):
        mat1 = lam_r * torch.eye(d, dtype=F64)
        mat2 = torch.zeros(d, d, dtype=F64)
        for w, w0 in zip(W, W0):
            mat1 += w.T @ w
            mat2 += w.T @ w0
        Cadv = C0 @ (torch.linalg.inv(mat1) @ mat2).T
        advs.append(Cadv)
        W = uce_edit_per_matrix(W, Cadv, targets.to(F64).reshape(-1, d), preserve.to(F64).reshape(-1, d),
                                lam=lam, eta_e=eta_e, eta_p=eta_p)
    return W, advs
