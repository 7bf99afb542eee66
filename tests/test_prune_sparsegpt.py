"""SparseGPT math against a literal dense OBS reference written here: column by column, the explicit inverse of
the Hessian restricted to the remaining columns at every step, no Cholesky and no lazy batch updates."""
from __future__ import annotations

import math

import pytest
import torch
from surgeon.ops.prune.sparsegpt import hessian, sparsegpt_prune
from test_prune_helpers import task_model_fixture  # noqa: F401  (fixture)

# --- the oracle -------------------------------------------------------------------------------------------------

def obs_reference(w: torch.Tensor, h: torch.Tensor, *, sparsity: float, nm=None, blocksize: int,
                  percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential OBS (arXiv 2301.00774 eq. 3 with F = the columns not yet processed), fp64.

    Before column j: Hinv_F = (H[j:, j:])⁻¹ explicitly. Saliency of column c: w_c² / [(H[c:, c:])⁻¹]_00.
    Unstructured: at the start of every block of ``blocksize`` columns prune the k lowest saliencies of the
    block, k = ⌊s·rows·end⌋ − ⌊s·rows·start⌋. N:M: at every M-th column prune the M − N lowest of the group.
    Then set the column to its pruned value and move the others by −(w_j − q)/Hinv_F[0,0] · Hinv_F[0, :]."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    for j in range(cols):
        if dead[j]:
            h[j, j] = 1.0
            w[:, j] = 0.0
    damp = percdamp * torch.diagonal(h).mean()
    h = h + damp * torch.eye(cols, dtype=torch.float64)

    def sal_denominator(c: int) -> float:
        return float(torch.linalg.inv(h[c:, c:])[0, 0])

    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        if nm is None:
            sal = torch.stack([w[:, c] ** 2 / sal_denominator(c) for c in range(b1, b2)], dim=1)
            k = math.floor(sparsity * rows * b2 + 1e-9) - math.floor(sparsity * rows * b1 + 1e-9)
            order = sorted(range(sal.numel()), key=lambda t: (float(sal.reshape(-1)[t]), t))[:k]
            for t in order:
                mask[t // (b2 - b1), b1 + t % (b2 - b1)] = True
        for j in range(b1, b2):
            if nm is not None and (j - b1) % nm[1] == 0:
                n, m = nm
                for r in range(rows):
                    sal = [(float(w[r, c] ** 2 / sal_denominator(c)), c) for c in range(j, j + m)]
                    for _, c in sorted(sal)[: m - n]:
                        mask[r, c] = True
            hinv = torch.linalg.inv(h[j:, j:])
            q = torch.where(mask[:, j], torch.zeros_like(w[:, j]), w[:, j])
            err = (w[:, j] - q) / hinv[0, 0]
            w[:, j:] -= err[:, None] * hinv[0, :][None, :]
            w[:, j] = q
    return w, mask


def calib(n_tok: int, cols: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated inputs with a few large channels (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    x = torch.randn(n_tok, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + mix)
    scale = torch.ones(cols, dtype=torch.float64)
    scale[torch.randperm(cols, generator=g)[: max(1, cols // 8)]] = 6.0
    x = x * scale
    x[:, list(dead)] = 0
    return x


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,blocksize,sparsity,dead", [
    (12, 40, 16, 0.5, ()),
    (9, 33, 8, 0.3, (3, 20)),  # partial last block, dead inputs
    (7, 24, 128, 0.7, ()),  # one block
])
def test_unstructured_equals_dense_obs(rows, cols, blocksize, sparsity, dead):
    x = calib(300, cols, seed=rows, dead=dead)
    h = hessian(x.T @ x, x.shape[0])
    w = weights(rows, cols, seed=cols)
    got = sparsegpt_prune(w, h, sparsity=sparsity, blocksize=blocksize)
    ref_w, ref_mask = obs_reference(w, h, sparsity=sparsity, blocksize=blocksize)
    assert torch.equal(got.mask, ref_mask)
    torch.testing.assert_close(got.weight, ref_w, rtol=1e-7, atol=1e-9)
    assert int(got.mask.sum()) == math.floor(sparsity * rows * cols + 1e-9)  # exact sparsity
    assert torch.equal(got.weight == 0, got.mask | _dead_cols(rows, cols, dead))
    assert got.error > 0


def _dead_cols(rows: int, cols: int, dead: tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(rows, cols, dtype=torch.bool)
    m[:, list(dead)] = True
    return m


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_equals_dense_obs_and_has_the_pattern(nm):
    rows, cols = 10, 32
    x = calib(250, cols, seed=3)
    h = hessian(x.T @ x, x.shape[0])
    w = weights(rows, cols, seed=4)
    got = sparsegpt_prune(w, h, nm=nm, blocksize=16)
    ref_w, ref_mask = obs_reference(w, h, sparsity=0.0, nm=nm, blocksize=16)
    assert torch.equal(got.mask, ref_mask)
    torch.testing.assert_close(got.weight, ref_w, rtol=1e-7, atol=1e-9)
    n, m = nm
    groups = (got.weight != 0).reshape(rows, cols // m, m).sum(-1)
    assert torch.all(groups == n)


def test_fp32_close_to_the_fp64_oracle():
    x = calib(400, 48, seed=7)
    h = hessian(x.T @ x, x.shape[0])
    w = weights(16, 48, seed=8)
    got = sparsegpt_prune(w.float(), h.float(), sparsity=0.5, blocksize=16)
    ref_w, ref_mask = obs_reference(w, h, sparsity=0.5, blocksize=16)
    assert (got.mask != ref_mask).float().mean() < 0.01
    assert got.weight.dtype == torch.float32
    rel = (got.weight.double() - ref_w).norm() / ref_w.norm()
    assert rel < 1e-3


def test_reconstruction_error_below_magnitude_and_wanda():
    rows, cols, s = 32, 64, 0.5
    x = calib(512, cols, seed=11)
    w = weights(rows, cols, seed=12)
    y = x @ w.T

    def err(w_hat: torch.Tensor) -> float:
        return float((y - x @ w_hat.T).norm())

    k = math.floor(s * w.numel())
    magnitude = w.clone().reshape(-1)
    magnitude[torch.argsort(w.abs().reshape(-1))[:k]] = 0  # per-matrix magnitude
    magnitude = magnitude.reshape(rows, cols)
    score = w.abs() * x.norm(dim=0)[None, :]  # Wanda: per output row, |W|·‖X_j‖
    wanda = w.clone()
    wanda.scatter_(1, torch.argsort(score, dim=1)[:, : int(s * cols)], 0.0)
    sgpt = sparsegpt_prune(w, hessian(x.T @ x, x.shape[0]), sparsity=s, blocksize=16).weight
    e_mag, e_wanda, e_sgpt = err(magnitude), err(wanda), err(sgpt)
    assert e_sgpt < e_wanda < e_mag
    assert e_sgpt < 0.8 * e_wanda
    for pruned in (magnitude, wanda, sgpt):
        assert int((pruned == 0).sum()) == k


def test_hessian_is_twice_the_mean_outer_product():
    x = calib(50, 6, seed=1)
    h = hessian(x.T @ x, 50)
    ref = sum(2 * torch.outer(r, r) for r in x) / 50
    torch.testing.assert_close(h, ref)


def test_bad_blocksize_for_nm():
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match="multiple of M"):
        sparsegpt_prune(weights(4, 16, 0), torch.eye(16), nm=(2, 4), blocksize=6)


# --- the op on a model ----------------------------------------------------------------------------------------------

def _reference_sequential(model, layers_names, tokens, sparsity):
    """Per block: whole-model forward passes with hooks (blocks before it already pruned), then the layer-wise
    SparseGPT of every linear of the block from those Hessians (the reference's default, not true-sequential)."""
    mods = dict(model.named_modules())
    for names in layers_names:
        grams: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        hooks = []
        for n in names:
            def hook(m, args, out, n=n, grams=grams, counts=counts):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[n] = grams.get(n, 0) + x.T @ x
                counts[n] = counts.get(n, 0) + x.shape[0]

            hooks.append(mods[n.rsplit(".", 1)[0]].register_forward_hook(hook))
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        for n in names:
            w = mods[n.rsplit(".", 1)[0]].weight
            new = sparsegpt_prune(w.detach().float(), hessian(grams[n], counts[n]), sparsity=sparsity).weight
            with torch.no_grad():
                w.copy_(new)
    return model


def _block_linears(g, i):
    return [n for n in g.names() if f"layers.{i}." in n and n.endswith("proj.weight")]


def test_sequential_calibration_equals_reference(task_model):
    from surgeon.ops.prune import sparsegpt

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(task_model))
    data = str(task_model.parent / "train.txt")
    ctx = Context()
    g2 = sparsegpt.apply(g, sparsegpt.Params(data=data, sparsity=0.5, seqlen=24, n_windows=16, batch_size=5), ctx)
    tokens = ctx.tokens(data, g, seqlen=24, max_windows=16)
    ref = _reference_sequential(ctx.module(g), [_block_linears(g, i) for i in range(2)], tokens, 0.5)
    sd = dict(ref.named_parameters())
    for n in _block_linears(g, 0) + _block_linears(g, 1):
        got = g2.value(n)
        assert int((got == 0).sum()) == got.numel() // 2, n  # exact per matrix
        assert (got == 0).eq(sd[n] == 0).float().mean() > 0.99, n
        torch.testing.assert_close(got, sd[n].detach(), rtol=1e-3, atol=2e-3)
    info = ctx.step_info
    assert info["sparsity"] == pytest.approx(0.5) and info["method"] == "sparsegpt"
    assert info["calibration_windows"] == 16


def test_sparsegpt_beats_wanda_and_magnitude_on_the_trained_task(task_model):
    from surgeon.ops.prune import magnitude, sparsegpt, wanda
    from test_prune_helpers import graph_loss

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(task_model))
    held, train = task_model.parent / "heldout.txt", str(task_model.parent / "train.txt")
    gs = sparsegpt.apply(g, sparsegpt.Params(data=train, sparsity=0.6, seqlen=24), Context())
    gw = wanda.apply(g, wanda.Params(data=train, sparsity=0.6, seqlen=24), Context())
    gm = magnitude.apply(g, magnitude.Params(sparsity=0.6), Context())
    dense, ls, lw, lm = (graph_loss(x, held) for x in (g, gs, gw, gm))
    print(f"\nheld-out NLL at 60%: dense {dense:.3f}  sparsegpt {ls:.3f}  wanda {lw:.3f}  magnitude {lm:.3f}")
    assert dense < ls < lw < lm


def test_nm_on_a_model_and_bad_input(task_model, tiny_llama):
    from surgeon.ops.prune import sparsegpt

    from surgeon.context import Context
    from surgeon.errors import SurgeonError
    from surgeon.graph import Graph
    from surgeon.pipeline import validate_step
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(task_model))
    g2 = sparsegpt.apply(g, sparsegpt.Params(data=str(task_model.parent / "train.txt"), nm="2:4", seqlen=24),
                         Context())
    for n in _block_linears(g, 0) + _block_linears(g, 1):
        w = g2.value(n)
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), n
    with pytest.raises(SurgeonError, match="multiple of M"):
        validate_step("prune.sparsegpt", {"nm": "2:4", "blocksize": 6})
    with pytest.raises(SurgeonError, match="contradicts"):
        validate_step("prune.sparsegpt", {"nm": "2:4", "sparsity": 0.7})
    with pytest.raises(SurgeonError, match="inside a decoder block"):
        sparsegpt.apply(Graph.from_checkpoint(open_checkpoint(tiny_llama)), sparsegpt.Params(include=["lm_head"]),
                        Context())
