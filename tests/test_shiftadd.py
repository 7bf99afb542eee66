"""ShiftAdd (ALGORITHMS.md §7): packing, LUT kernel, BCQ/APoT fit, activation-aware fit, bit allocation, format,
loader."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from oracles.shiftadd import lut_gemv_reference
from surgeon.kernels.shiftadd import KERNEL_CALLS, PackedLinear
from surgeon.kernels.shiftadd_cpu import (
    CLutWeights,
    c_kernel,
    c_lut_gemv_prepared,
    dequantize,
    lut_gemv,
    pack_signs,
    unpack_signs,
)
from surgeon.ops.shiftadd.bcq import bcq_fit, codebook, nearest_code, quantize_weight_only
from surgeon.ops.shiftadd.gptq import (
    FP64_MAX_WIDTH,
    _inverse_cholesky_upper,
    allocate_bits,
    output_error,
    quantize_gptq,
    sensitivity_score,
)
from surgeon.ops.shiftadd.op import Params
from surgeon.ops.shiftadd.scales import pot_greedy

from surgeon.errors import SurgeonError
from surgeon.formats.shiftadd import ABSENT_EXP, pot_decode


def pot_round(alpha: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, exponents, negative-term bits) of the greedy APoT rounding."""
    exps = torch.full((*alpha.shape, terms), ABSENT_EXP, dtype=torch.int8)
    neg = torch.zeros(alpha.shape, dtype=torch.uint8)
    return pot_greedy(alpha, terms, exps, neg), exps, neg

@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine is shared and oversubscribed: OpenMP barriers of two threads on tiny tensors cost ~10x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_packed(q: int, n: int, k: int, gs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(0, 256, (q, n, -(-k // 8)), dtype=torch.uint8, generator=g)
    if k % 8:  # padding bits beyond K are zero, as pack_signs writes them
        qw[..., -1] &= (1 << (k % 8)) - 1
    sc = torch.randn(q, n, -(-k // gs), generator=g)
    return qw, sc


# ---------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 200])
def test_pack_unpack_roundtrip_bit_exact(k):
    signs = torch.where(torch.rand(3, 5, k) < 0.5, -1.0, 1.0)
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-k // 8))
    assert torch.equal(unpack_signs(packed, k), signs)
    assert torch.equal(pack_signs(unpack_signs(packed, k)), packed)


def test_bit_order_is_little_endian_plus_one_is_set():
    signs = torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, -1, -1, 1]])  # col 0 and col 9 positive
    assert pack_signs(signs).tolist() == [[1, 2]]


# ------------------------------------------------------------------------------------------------- LUT kernel
@pytest.mark.parametrize("q,n,k,gs", [(3, 37, 200, 40), (2, 70, 130, 64), (1, 64, 64, 64), (3, 129, 520, 128),
                                      (4, 16, 72, 8)])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_lut_gemv_equals_dense_product_of_unpacked_weights(q, n, k, gs, m):
    qw, sc = _random_packed(q, n, k, gs, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = lut_gemv_reference(x, qw, sc, k, gs)
    tol = 2e-6 * ref.abs().max() * math.sqrt(k / 64) + 1e-7
    y = lut_gemv(x, qw, sc, k, gs)  # numba
    assert y.shape == (m, n)
    assert (y - ref).abs().max() <= tol
    if c_kernel() is not None:  # C/AVX2 nibble-table kernel
        yc = c_lut_gemv_prepared(x, CLutWeights(qw, sc, k, gs))
        assert yc.shape == (m, n)
        assert (yc - ref).abs().max() <= tol


def test_dispatch_uses_lut_for_small_batches_and_blas_for_large_and_honours_perm():
    q, n, k, gs = 3, 48, 96, 32
    qw, sc = _random_packed(q, n, k, gs, seed=3)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    lin = PackedLinear(qw, sc, k, gs, perm)
    w = lin.dense()  # original column order
    assert torch.allclose(w[:, perm], dequantize(qw, sc, k, gs))
    before = dict(KERNEL_CALLS)
    x = torch.randn(2, 3, k)  # 6 rows: LUT
    assert torch.allclose(lin.matmul(x), x @ w.T, rtol=1e-5, atol=1e-4)
    lut = "c-avx2-lut" if c_kernel() is not None else "numba-lut"
    assert lin.last_kernel == lut
    xb = torch.randn(20, k)  # above max_lut_batch: dequantise + BLAS
    assert torch.allclose(lin.matmul(xb), xb @ w.T, rtol=1e-5, atol=1e-4)
    assert lin.last_kernel == "dequant-blas"
    assert KERNEL_CALLS[lut] == before.get(lut, 0) + 1


# ------------------------------------------------------------------------------------------------ APoT scales
def test_one_term_pot_scales_are_exact_powers_of_two():
    alpha = torch.randn(500).abs() * 0.05 + 1e-4
    values, exps, neg = pot_round(alpha, 1)
    log = torch.log2(values.abs())
    assert torch.equal(log, log.round())
    assert torch.equal(values, torch.exp2(exps[:, 0].float()) * torch.where(neg > 0, -1.0, 1.0))
    # greedy rounding is round(log2): within a factor sqrt(2) of the input
    ratio = values / alpha
    assert ratio.min() >= 2 ** -0.5 - 1e-6 and ratio.max() <= 2 ** 0.5 + 1e-6


def test_three_term_apot_is_exact_in_fp16_and_decodes_back():
    alpha = torch.randn(1000, generator=torch.Generator().manual_seed(11)) * 0.03
    values, exps, neg = pot_round(alpha, 3)
    assert torch.equal(values.half().float(), values)
    assert torch.equal(pot_decode(exps, neg), values)
    # each greedy term leaves at most (sqrt(2) - 1) of its residual: 3 terms < 0.072 relative
    assert ((values - alpha).abs() <= alpha.abs() * (2 ** 0.5 - 1) ** 3 + 1e-12).all()
    assert ((values - alpha).abs() < (pot_round(alpha, 1)[0] - alpha).abs() + 1e-12).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------------ BCQ
def test_bcq_error_decreases_monotonically_over_rounds():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    _, _, history = bcq_fit(w, 3, rounds=15, pot_terms=0)
    assert len(history) == 16
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history))
    assert history[-1] < 0.8 * history[0]  # the alternating rounds improve on the greedy init


def test_bcq_recovers_bcq_representable_weights():
    g = torch.Generator().manual_seed(1)
    signs = torch.where(torch.rand(32, 128, 2, generator=g) < 0.5, -1.0, 1.0)
    alpha = torch.stack([torch.full((32,), 0.5), torch.full((32,), 0.125)], 1) * 2.0 ** (torch.arange(32)[:, None] % 3)
    w = (signs * alpha[:, None, :]).sum(-1)
    a, s, history = bcq_fit(w, 2, rounds=10, pot_terms=1)
    assert history[-1] <= 1e-10 * float((w ** 2).sum())
    assert torch.allclose((s * a[:, None, :]).sum(-1), w)


def nearest_codeword(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs [R, C, q] of the codeword nearest to each element of ``w`` (the codebook row nearest_code picks)."""
    return codebook(alpha.shape[1], w.device)[nearest_code(w, alpha)]


def test_nearest_codeword_is_the_argmin_over_all_sign_combinations():
    w = torch.randn(10, 7)
    alpha = torch.tensor([[0.9, 0.4, 0.1]]).repeat(10, 1)
    s = nearest_codeword(w, alpha)
    best = (s * alpha[:, None, :]).sum(-1)
    for combo in range(8):
        b = torch.tensor([1.0 if combo >> i & 1 else -1.0 for i in range(3)])
        assert ((w - best).abs() <= (w - (alpha * b).sum(-1, keepdim=True)).abs() + 1e-7).all()


# --------------------------------------------------------------------------------------- activation-aware fit
def _correlated_inputs(k: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    scale = torch.exp(torch.randn(k, generator=g))  # outlier channels, as in LLM activations
    return (torch.randn(n_tokens, k, generator=g) @ mix) * scale


def test_identity_hessian_reduces_to_per_group_bcq():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    wo = quantize_weight_only(w, 3, 16, rounds=5)
    gp = quantize_gptq(w, torch.eye(64), 3, 16, rounds=5, act_order=False)
    assert torch.equal(gp.qweight, wo.qweight)
    assert torch.equal(gp.dense(), wo.dense())


def test_activation_aware_output_error_not_above_weight_only_on_calibration_activations():
    k, n = 96, 48
    x = _correlated_inputs(k, 2048)
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    for bits, pot in ((3, 3), (2, 1)):
        wo = quantize_weight_only(w, bits, 32, rounds=10, pot_terms=pot).dense()
        aa = quantize_gptq(w, h, bits, 32, rounds=10, pot_terms=pot).dense()
        e_wo = float((x @ (w - wo).T).norm() / (x @ w.T).norm())
        e_aa = float((x @ (w - aa).T).norm() / (x @ w.T).norm())
        assert e_aa <= e_wo
        assert abs(output_error(w, aa, h) - e_aa) < 1e-4
    assert e_aa < 0.8 * e_wo  # with outlier channels the calibrated fit is clearly better


def test_act_order_perm_is_whole_byte_blocks_and_is_stored():
    k = 52
    x = _correlated_inputs(k, 512, seed=4)
    h = x.T @ x / 512
    ql = quantize_gptq(torch.randn(8, k), h, 2, 8, rounds=2)
    perm = ql.perm.long()
    assert sorted(perm.tolist()) == list(range(k))
    assert all(int(perm[i]) % 8 == 0 for i in range(0, k, 8))  # each 8-column block starts on a byte
    assert all(int(perm[i + 1]) == int(perm[i]) + 1 for i in range(k - 1) if (i + 1) % 8)


def test_chunked_dense_view_equals_the_one_shot_dequantisation_with_act_order():
    """QuantizedLinear.dense() dequantises a few rows at a time; the oracle: Σ_i α_i ⊙ B_i of the unpacked signs
    and repeated scales for all rows at once, columns put back through perm."""
    x = _correlated_inputs(40, 256, seed=7)
    ql = quantize_gptq(torch.randn(13, 40, generator=torch.Generator().manual_seed(8)), x.T @ x / 256, 3, 8,
                       rounds=2)
    signs = ((ql.qweight.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(3, 13, -1)[..., :40]
    w_packed = ((signs.float() * 2 - 1) * ql.alpha.repeat_interleave(8, dim=-1)[..., :40]).sum(0)
    ref = torch.empty_like(w_packed)
    ref[:, ql.perm.long()] = w_packed
    for rows in (1, 4, 512):
        assert torch.equal(ql.dense(rows_per_chunk=rows), ref)


@pytest.mark.parametrize("fp64_max_width", [FP64_MAX_WIDTH, 16])  # the fp64 and the fp32 (wide) factorisations
def test_in_place_inverse_cholesky_equals_the_textbook_formula_and_keeps_h(fp64_max_width, monkeypatch):
    """U with UᵀU = (P H Pᵀ + λI)⁻¹, λ = damping·mean(diag H), as GPTQ writes it: chol(inv(H + λI), upper)."""
    from surgeon.ops.shiftadd import gptq

    monkeypatch.setattr(gptq, "FP64_MAX_WIDTH", fp64_max_width)
    width = 40
    x = _correlated_inputs(width, width + 64, seed=5)
    h = x.T @ x / x.shape[0]
    before = h.clone()
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(6))
    u = _inverse_cholesky_upper(h, 0.01, perm)
    hp = before.double()[perm][:, perm]
    ref = torch.linalg.cholesky(torch.linalg.inv(hp + 0.01 * hp.diagonal().mean() * torch.eye(width,
                                                                                               dtype=torch.float64)),
                                upper=True)
    tol = 1e-6 if fp64_max_width >= width else 1e-4  # U is returned in fp32
    assert torch.allclose(u.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert torch.equal(h, before)
    assert torch.equal(u, torch.triu(u))


def test_inverse_cholesky_retries_with_more_damping_from_an_intact_copy():
    """An indefinite H (eigenvalue −0.05): λ = 1 % of mean(diag H) fails, 10 % succeeds; the failed in-place
    attempt must not leak into the retry."""
    h = torch.diag(torch.tensor([1.0, 2.0, 1.5, -0.05]))
    h[0, 1] = h[1, 0] = 0.3
    lam = 0.1 * float(h.diagonal().mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(h.double() + lam * torch.eye(4, dtype=torch.float64)), upper=True)
    assert torch.allclose(_inverse_cholesky_upper(h, 0.01).double(), ref, atol=1e-6)

# ------------------------------------------- reference layouts (GATECH-EIC/ShiftAddLLM fasterquant, lat / acc)
def _reference_bst_assign(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Port of the reference's find_B_torch + reconstruction: per row of ``w`` [R, C] the nearest codeword of
    alpha [R, q], found by binary search over the sorted codeword values; returns the reconstruction [R, C]."""
    bits = alpha.shape[1]
    vecs = [[]]
    for _ in range(bits):
        vecs = [[1.0] + v for v in vecs] + [[-1.0] + v for v in vecs]
    bin_mat = torch.tensor(vecs)
    v_sorted, inds = torch.sort(alpha @ bin_mat.T)
    r, c = w.shape
    rows = torch.arange(r).view(r, 1).repeat(1, c).view(-1)
    flat = w.reshape(-1)
    left = torch.zeros(r * c, dtype=torch.long)
    right = torch.full((r * c,), 2 ** bits - 1, dtype=torch.long)
    for _ in range(bits):
        mid_l = torch.div(left + right - 1, 2, rounding_mode="trunc")
        mid_r = mid_l + 1
        go_left = flat < (v_sorted[rows, mid_l] + v_sorted[rows, mid_r]) / 2
        right[go_left] = mid_l[go_left]
        left[~go_left] = mid_r[~go_left]
    b = bin_mat[inds[rows, left]].view(r, c, bits)
    return torch.einsum("rcb,rb->rc", b, alpha)


def _reference_fasterquant(w: torch.Tensor, h: torch.Tensor, bits: int, groupsize: int, mode: str, fit,
                           blocksize: int, percdamp: float = 0.01) -> torch.Tensor:
    """Literal port of ShiftAddLLM's ``fasterquant`` (lat. = block_quant, acc. = columnwise; act-order on, as both
    modes set it; preproc_gptqH's dead columns and damping; no QuIP) with the BCQ fit of one group batch passed
    in as ``fit`` ([groups, elements] -> α [groups, q]). Hessian factors in fp64 here. Returns Q (original
    column order)."""
    w, h = w.clone().float(), h.clone().double()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    if mode == "lat":
        rows = groupsize // 8
        perm = torch.argsort(torch.diag(h).reshape(-1, 8).sum(-1), descending=True)
        w = w.reshape(n, k // 8, 8)[:, perm, :].reshape(n, k)
        h = h.reshape(k // 8, 8, k // 8, 8)[perm, :, :, :][:, :, perm, :].reshape(k, k)
    else:
        rows = groupsize
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if mode == "lat":
                if i % 8 == 0:  # α from the 8 error-updated columns, groups of (rows × 8) flattened row-major
                    alpha = fit(w1[:, i:i + 8].flatten().view(-1, rows * 8))
            else:  # α from this error-updated column, groups of `rows` rows
                alpha = fit(col.view(-1, rows))
            q = _reference_bst_assign(col.view(-1, rows), alpha).flatten()
            q_all[:, i1 + i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    inv = torch.argsort(perm)
    if mode == "lat":
        return q_all.reshape(n, k // 8, 8)[:, inv, :].reshape(n, k)
    return q_all[:, inv]


@pytest.mark.parametrize("layout", ["lat", "acc"])
def test_reference_layouts_match_a_port_of_the_reference_column_loop(layout):
    n, k, gs, bits = 32, 48, 16, 3
    x = _correlated_inputs(k, 512, seed=7)
    h = x.T @ x / x.shape[0]
    h[5, :] = 0
    h[:, 5] = 0  # a dead input column
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.05

    def fit(groups: torch.Tensor) -> torch.Tensor:
        return bcq_fit(groups, bits, rounds=3, pot_terms=3)[0]

    ref = _reference_fasterquant(w, h, bits, gs, layout, fit, blocksize=16)
    ql = quantize_gptq(w, h, bits, gs, rounds=3, pot_terms=3, block_size=16, scale_layout=layout)
    ours = ql.dense()
    assert torch.allclose(ours, ref, atol=1e-6)
    # α geometry: lat one value per (8 columns, gs/8 rows); acc one per (column, gs rows)
    a = ql.alpha  # [q, N, K / stored group]
    if layout == "lat":
        assert ql.group_size == 8 and a.shape == (bits, n, k // 8)
        assert torch.equal(a, a[:, ::gs // 8].repeat_interleave(gs // 8, dim=1))
    else:
        assert ql.group_size == 1 and a.shape == (bits, n, k)
        assert torch.equal(a, a[:, ::gs].repeat_interleave(gs, dim=1))
    # and both differ from our row layout on the same problem
    row = quantize_gptq(w, h, bits, gs, rounds=3, pot_terms=3, block_size=16).dense()
    assert not torch.allclose(row, ref, atol=1e-4)


def test_lat_layout_handles_row_counts_that_are_not_a_multiple_of_the_row_group():
    n, k = 20, 32  # lat at gs 64: groups of 8 rows -> 8, 8, 4
    x = _correlated_inputs(k, 256, seed=9)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(10))
    ql = quantize_gptq(w, x.T @ x / 256, 2, 64, rounds=2, scale_layout="lat")
    assert ql.alpha.shape == (2, n, k // 8)
    assert torch.equal(ql.alpha[:, 16:20], ql.alpha[:, 16:17].expand(-1, 4, -1))
    assert not torch.equal(ql.alpha[:, 15], ql.alpha[:, 16])


# ------------------------------------------------------------------------------------------- bit allocation
def test_bit_allocation_meets_budget_and_prefers_sensitive_layers():
    scores = {"a": 5.0, "b": 1.0, "c": 3.0, "d": 0.5}
    numels = {"a": 100, "b": 100, "c": 200, "d": 100}
    bits = allocate_bits(scores, numels, 2.4, 2, 3)
    avg = sum(bits[n] * numels[n] for n in bits) / sum(numels.values())
    assert avg <= 2.4 + 1e-9
    assert bits == {"a": 3, "b": 3, "c": 2, "d": 2}  # a first; c does not fit after a; b does


def test_sensitivity_score_follows_the_sheet_formula():
    w = torch.randn(16, 32)
    m_norm, m_std = float(w.norm()), float(w.std())
    assert sensitivity_score(w) == pytest.approx(m_norm * m_std ** 2, rel=1e-5)
    h = torch.diag(torch.linspace(0.5, 4.0, 32))  # diagonal H: d_j = 1/sqrt(H_jj + damp)
    damp = 0.01 * float(h.diagonal().mean())
    m = w * torch.sqrt(h.diagonal() + damp)[None, :]
    assert sensitivity_score(w, h, 0.01) == pytest.approx(float(m.norm() * m.std() ** 2), rel=1e-4)


# --------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("bad", [{"group_size": 12}, {"bits_budget": 3.5}, {"bits": 1, "bits_budget": 1.0},
                                 {"pot_terms": 4}, {"bogus": 1}, {"weight_only": True, "data": "calib.txt"},
                                 {"scale_layout": "lat"}, {"scale_layout": "acc", "materialize": True,
                                                           "weight_only": True}, {"scale_layout": "rows"}])
def test_bad_params_fail_validation(bad):
    with pytest.raises(ValueError):
        Params(**bad)


# --------------------------------------------------------------------------------------- graph, format, loader
def _graph(path: Path):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    return Graph.from_checkpoint(open_checkpoint(path))


def _run(src: Path, out: Path, **kw):
    from surgeon.ops.shiftadd.op import apply

    from surgeon.context import Context
    from surgeon.writer import write_graph

    ctx = Context(quiet=True)
    g2 = apply(_graph(src), Params(**kw), ctx)
    write_graph(g2, out, ctx=ctx)
    return g2, ctx


def test_weight_only_is_lazy_and_writes_the_packed_format(tiny_llama, tmp_path):
    from surgeon.ops.shiftadd.op import apply

    from surgeon.context import Context
    from surgeon.graph import Apply

    g = _graph(tiny_llama)
    g2 = apply(g, Params(bits=3, group_size=32, rounds=3, weight_only=True), Context(quiet=True))
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.weight" not in g2 and isinstance(g2[f"{name}.qweight"], Apply)
    assert g2[f"{name}.qweight"].shape == (3, 64, 128 // 8)  # down: [64, 128]
    assert g2[f"{name}.pot_exp"].shape == (3, 64, 4, 3) and g2[f"{name}.pot_exp"].dtype == torch.int8
    assert g2[f"{name}.pot_sign"].shape == (3, 64, 4)
    assert "model.embed_tokens.weight" in g2 and "lm_head.weight" in g2  # never quantised
    qc = g2.config["quantization_config"]
    assert qc["quant_method"] == "shiftadd" and qc["bits"] == 3 and qc["group_size"] == 32
    assert qc["modules"][name] == {"bits": 3, "in_features": 128}
    # the packed tensors decode to the same Ŵ as the op's own weight-only fit
    w = g.value(f"{name}.weight")
    ref = quantize_weight_only(w, 3, 32, rounds=3).dense()
    scales = pot_decode(g2.value(f"{name}.pot_exp"), g2.value(f"{name}.pot_sign"))
    assert torch.equal(dequantize(g2.value(f"{name}.qweight"), scales, 128, 32), ref)


def test_packed_model_logits_equal_materialized_model(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.formats.shiftadd import ShiftAddLinear, load_shiftadd

    _run(tiny_llama, tmp_path / "packed", bits=3, group_size=32, rounds=3, bits_budget=2.5, weight_only=True)
    _run(tiny_llama, tmp_path / "dense", bits=3, group_size=32, rounds=3, bits_budget=2.5, materialize=True,
         weight_only=True)
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg
    packed = load_shiftadd(tmp_path / "packed")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert isinstance(packed.model.layers[0].self_attn.q_proj, ShiftAddLinear)
    bits = {packed.get_submodule(n).packed.bits for n, m in packed.named_modules() if isinstance(m, ShiftAddLinear)}
    assert bits == {2, 3}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in (ids[:1, :1], ids[:1], ids):  # LUT (1 row), LUT (9 rows -> BLAS), BLAS
            a, b = packed(batch).logits, dense(batch).logits
            assert (a - b).abs().max() < 1e-4
    size = sum(p.stat().st_size for p in (tmp_path / "packed").glob("*.safetensors"))
    dense_size = sum(p.stat().st_size for p in (tmp_path / "dense").glob("*.safetensors"))
    assert size < dense_size


def test_calibrated_shiftadd_beats_weight_only_on_layer_outputs_and_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.formats.shiftadd import load_shiftadd

    _, ctx = _run(tiny_llama, tmp_path / "cal", bits=2, group_size=32, rounds=3, data="model:4", seqlen=32)
    info = ctx.step_info
    assert info["format"] == "packed" and info["calibration_tokens"] == 4 * 32
    qc = json.loads((tmp_path / "cal" / "config.json").read_text())["quantization_config"]
    assert qc["calibrated"] and qc["act_order"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cal" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.perm" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    _run(tiny_llama, tmp_path / "cal-dense", bits=2, group_size=32, rounds=3, data="model:4", seqlen=32,
         materialize=True)
    packed = load_shiftadd(tmp_path / "cal")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "cal-dense")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert (packed(ids[:, :1]).logits - dense(ids[:, :1]).logits).abs().max() < 1e-4
        assert (packed(ids).logits - dense(ids).logits).abs().max() < 1e-4


def test_calibrated_is_the_default_and_weight_only_is_explicit(tiny_llama, tmp_path):
    from surgeon.cli import main

    assert Params().data == "model:32" and not Params().weight_only
    # no --data: the model samples its own calibration text (capped here to 2 windows of 16 tokens)
    out = tmp_path / "default"
    assert main(["shiftadd", str(tiny_llama), "--bits", "2", "--group-size", "32", "--rounds", "1",
                 "--seqlen", "16", "--max-windows", "2", "-o", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibrated"] and qc["act_order"]
    out = tmp_path / "weight-only"
    assert main(["shiftadd", str(tiny_llama), "--bits", "2", "--group-size", "32", "--rounds", "1",
                 "--weight-only", "-o", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not qc["calibrated"] and not qc["act_order"]
    assert main(["shiftadd", str(tiny_llama), "--weight-only", "--data", "model:2", "-o",
                 str(tmp_path / "both")]) == 2
    assert not (tmp_path / "both").exists()


@pytest.mark.parametrize("layout", ["lat", "acc"])
def test_reference_layouts_run_end_to_end_as_dense_output(tiny_llama, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    g2, ctx = _run(tiny_llama, tmp_path / layout, bits=2, group_size=16, rounds=1, data="model:2", seqlen=16,
                   scale_layout=layout, materialize=True)
    assert ctx.step_info["format"] == "dense (materialized)" and "quantization_config" not in g2.config
    w = g2.value("model.layers.0.mlp.down_proj.weight")  # [64, 128], 2 planes: at most 4 values per α group
    if layout == "acc":  # α per (column, 16 rows)
        blocks = w.reshape(4, 16, 128).permute(0, 2, 1).reshape(-1, 16)
    else:  # α per (8 columns, 2 rows); act-order keeps 8-column blocks whole
        blocks = w.reshape(32, 2, 16, 8).permute(0, 2, 1, 3).reshape(-1, 16)
    assert max(len(set(b.tolist())) for b in blocks) <= 4
    AutoModelForCausalLM.from_pretrained(tmp_path / layout)


def test_loader_refuses_a_folder_that_is_not_shiftadd(tiny_llama):
    from surgeon.formats.shiftadd import load_shiftadd

    with pytest.raises(SurgeonError, match="quant_method"):
        load_shiftadd(tiny_llama)
    with pytest.raises(SurgeonError, match="config.json"):
        load_shiftadd(tiny_llama / "nope")


def test_registered_and_reexported():
    import surgeon
    from surgeon.registry import get_op

    spec = get_op("shiftadd")
    assert spec.params is Params
    assert surgeon.load_shiftadd.__name__ == "load_shiftadd"


def test_stored_pot_exponents_decode_exactly_to_the_fitted_scales():
    from surgeon.formats.shiftadd import pot_decompose

    alpha = torch.randn(4000, dtype=torch.float64) * torch.exp(torch.randn(4000, dtype=torch.float64) * 2)
    for terms in (1, 2, 3):
        values = pot_round(alpha, terms)[0]
        exps, neg = pot_decompose(values, terms)
        assert torch.equal(pot_decode(exps, neg), values)


def test_dense_view_of_a_packed_graph_equals_the_materialized_graph(tiny_llama):
    from surgeon.ops.shiftadd.op import apply

    from surgeon.context import Context
    from surgeon.formats.shiftadd import dense_view

    g = _graph(tiny_llama)
    packed = apply(g, Params(bits=2, group_size=16, rounds=2, weight_only=True), Context(quiet=True))
    dense = apply(g, Params(bits=2, group_size=16, rounds=2, materialize=True, weight_only=True), Context(quiet=True))
    view = dense_view(packed)
    assert "quantization_config" not in view.config and view.names() == dense.names()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(view.value(name), dense.value(name))


def _oracle_calibrated(graph, tokens, layers: list[int], **kw) -> dict[str, torch.Tensor]:
    """Whole-model sequential GPTQ-BCQ (the pre-engine path, written out): for each quantised layer in order, run
    the materialised fp32 model over the calibration tokens with layers before it already quantised, take
    H = XXᵀ/n of each linear's input, fit, and copy Ŵ into the model. Returns {weight name: Ŵ}."""
    from surgeon.ops.shiftadd.gptq import quantize_gptq

    from surgeon.model import materialize

    model = materialize(graph)
    out = {}
    for i in layers:
        mods = {n: m for n, m in model.model.layers[i].named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {n: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64), 0] for n, m in mods.items()}
        def hook(_m, args, acc):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[0] += x.T @ x
            acc[1] += x.shape[0]

        hooks = [m.register_forward_pre_hook(lambda _m, a, acc=sums[n]: hook(_m, a, acc)) for n, m in mods.items()]
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        for n, m in mods.items():
            w_hat = quantize_gptq(m.weight.detach().float(), (sums[n][0] / sums[n][1]).float(), **kw).dense()
            with torch.no_grad():
                m.weight.copy_(w_hat)
            out[f"model.layers.{i}.{n}.weight"] = w_hat
    return out


def test_calibrated_engine_fit_equals_the_whole_model_sequential_fit_and_layers_restricts(tiny_llama):
    from surgeon.ops.shiftadd.op import apply

    from surgeon.context import Context
    from surgeon.engine import Spilled

    g = _graph(tiny_llama)
    ctx = Context(quiet=True)
    tokens = ctx.tokens("model:4", g, seqlen=32, max_windows=4)
    ref = _oracle_calibrated(g, tokens, [0], bits=2, group_size=32, rounds=3)
    g2 = apply(g, Params(bits=2, group_size=32, rounds=3, data="model:4", seqlen=32, max_windows=4,
                         materialize=True, layers=[0]), ctx)
    assert ctx.step_info["engine_blocks"] == 1  # block 1 is never run: nothing after block 0 is quantised
    for name, w_hat in ref.items():
        assert isinstance(g2[name], Spilled)
        got = g2.value(name)
        assert (got - w_hat).norm() / w_hat.norm() < 1e-5, name
    assert g2.value("model.layers.1.mlp.down_proj.weight").equal(g.value("model.layers.1.mlp.down_proj.weight"))
    ref01 = _oracle_calibrated(g, tokens, [0, 1], bits=2, group_size=32, rounds=3)
    g3 = apply(g, Params(bits=2, group_size=32, rounds=3, data="model:4", seqlen=32, max_windows=4,
                         materialize=True), Context(quiet=True))
    for name, w_hat in ref01.items():
        assert (g3.value(name) - w_hat).norm() / w_hat.norm() < 1e-4, name  # block 1 sees the quantised block 0


def test_layers_restricts_the_packed_output_and_it_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.formats.shiftadd import ShiftAddLinear, load_shiftadd

    g2, _ = _run(tiny_llama, tmp_path / "packed", bits=2, group_size=32, rounds=2, data="model:2", seqlen=16,
                 layers=[1])
    assert "model.layers.0.mlp.down_proj.weight" in g2 and "model.layers.1.mlp.down_proj.qweight" in g2
    assert all(k.startswith("model.layers.1.") for k in g2.config["quantization_config"]["modules"])
    _run(tiny_llama, tmp_path / "dense", bits=2, group_size=32, rounds=2, data="model:2", seqlen=16, layers=[1],
         materialize=True)
    packed = load_shiftadd(tmp_path / "packed")
    assert not isinstance(packed.model.layers[0].mlp.down_proj, ShiftAddLinear)
    assert isinstance(packed.model.layers[1].mlp.down_proj, ShiftAddLinear)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (packed(ids).logits - dense(ids).logits).abs().max() < 1e-4
    with pytest.raises(Exception, match="block 5 does not exist"):
        _run(tiny_llama, tmp_path / "bad", bits=2, group_size=32, data="model:2", seqlen=16, layers=[5])


def test_calibrated_bits_budget_allocates_from_the_engine_sweep(tiny_llama, tmp_path):
    g2, ctx = _run(tiny_llama, tmp_path / "budget", bits=3, bits_budget=2.5, group_size=32, rounds=1,
                   data="model:2", seqlen=16)
    bits = ctx.step_info["bits_per_layer"]
    assert set(bits.values()) == {2, 3}
    assert ctx.step_info["average_bits"] <= 2.5 + 1e-9
    assert g2.config["quantization_config"]["calibrated"]
