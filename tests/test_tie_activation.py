"""Activation-aware relaxation (`tie --lora-init activation`): the whitened truncated SVD minimises each layer's
output error on calibration inputs, is exact at full rank, and the op wires the original model's input Gram
matrices into it (docs/tie.md, "Activation-aware LoRA initialisation")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from surgeon.ops.tie.op import Params, apply
from surgeon.ops.tie.relax import relax_residual, relax_residual_whitened

from surgeon.context import Context
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint
from tests.conftest import save_tiny_llama_with_tokenizer, word_text

FULL = 10_000


def _numpy_whitened_optimum(r: np.ndarray, x: np.ndarray, rank: int, damp: float) -> tuple[float, np.ndarray]:
    """Literal port of the method: C = X Xᵀ + λ·mean(diag C)·I, L = chol(C), SVD of R L, keep r, map back by
    L⁻¹. Returns the dropped energy √Σ_{i>r}σ_i² and the rank-r delta."""
    c = x @ x.T
    c = c + damp * np.mean(np.diag(c)) * np.eye(c.shape[0])
    chol = np.linalg.cholesky(c)
    u, s, vt = np.linalg.svd(r @ chol, full_matrices=False)
    delta = (u[:, :rank] * s[:rank]) @ vt[:rank] @ np.linalg.inv(chol)
    return float(np.sqrt(np.sum(s[rank:] ** 2))), delta


def _calibration(n_in: int, n_tok: int, seed: int) -> np.ndarray:
    """Anisotropic inputs (a few loud channels, as in LLM activations) so whitening matters."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0, 1.5, n_in))
    mix = np.eye(n_in) + 0.3 * rng.normal(size=(n_in, n_in))
    return mix @ (rng.normal(size=(n_in, n_tok)) * scales[:, None])


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_whitened_svd_output_error_is_the_dropped_whitened_energy(rank):
    rng = np.random.default_rng(rank)
    res = rng.normal(size=(14, 10))
    x = _calibration(10, 60, seed=rank)
    damp = 1e-9  # effectively undamped: C = X Xᵀ is full rank with 60 tokens over 10 inputs
    dropped, delta_ref = _numpy_whitened_optimum(res, x, rank, damp)
    rx = relax_residual_whitened(torch.tensor(res, dtype=torch.float32), torch.tensor(x @ x.T), rank, damp=damp)
    delta = (rx.up.double() @ rx.down.double()).numpy()
    out_err = np.linalg.norm((res - delta) @ x)
    assert rx.up.shape == (14, rank) and rx.down.shape == (rank, 10)
    assert out_err == pytest.approx(dropped, rel=1e-4)  # Eckart–Young in the whitened space: the optimum
    assert rx.error == pytest.approx(dropped, rel=1e-4)
    assert np.abs(delta - delta_ref).max() < 1e-4 * np.abs(delta_ref).max()
    plain = relax_residual(torch.tensor(res, dtype=torch.float32), rank, method="exact")
    plain_err = np.linalg.norm((res - (plain.up.double() @ plain.down.double()).numpy()) @ x)
    assert out_err < plain_err  # the paper's weight-space SVD is worse on the outputs
    assert np.allclose(np.linalg.norm(rx.down.numpy(), axis=1), 1.0, atol=1e-5)  # A's rows have unit norm


def test_whitened_svd_is_exact_at_full_rank_even_with_few_tokens():
    rng = np.random.default_rng(0)
    res = rng.normal(size=(9, 16))
    x = _calibration(16, 5, seed=1)  # 5 tokens over 16 inputs: C is singular, the damping makes L invertible
    rx = relax_residual_whitened(torch.tensor(res, dtype=torch.float32), torch.tensor(x @ x.T), FULL, damp=0.01)
    assert rx.up.shape == (9, 9)
    assert np.abs((rx.up.double() @ rx.down.double()).numpy() - res).max() < 1e-4
    assert rx.error < 1e-4 * rx.residual_norm


# --- the op --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tie_act") / "m", seed=4)
    (folder.parent / "calib.txt").write_text(word_text(900, seed=5))
    return folder


def _graph(path: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(path))


def _calib_params(model: Path, **kw) -> Params:
    return Params(lora_init="activation", calibration=str(model.parent / "calib.txt"), calibration_windows=6,
                  calibration_seqlen=24, untie_norms=True, materialize=True, **kw)


def _layer_inputs(model: Path, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of every linear of the original model on ``ids`` (independent of the engine)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    got: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(m.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_pre_hook(
                    lambda _m, a, key=(i, name): got.__setitem__(key, a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    return got


def test_op_minimises_each_layers_output_error_on_the_calibration_tokens(model):
    rank = 3
    ctx = Context()
    act = apply(_graph(model), _calib_params(model, rank=rank), ctx)
    plain = apply(_graph(model), Params(rank=rank, untie_norms=True, materialize=True, svd="exact"), Context())
    ids = ctx.tokens(str(model.parent / "calib.txt"), _graph(model), seqlen=24, max_windows=6)
    inputs = _layer_inputs(model, ids)
    src = _graph(model)
    stats = {(e["layer"], e["module"]): e for e in json.loads(act.extra_files["recursion.json"])["modules"]}
    for layer, module in ((0, "self_attn.q_proj"), (2, "mlp.down_proj"), (3, "self_attn.o_proj")):
        name = f"model.layers.{layer}.{module}.weight"
        w, x = src.value(name).double(), inputs[(layer, module)]
        partner = src.value(f"model.layers.{(layer + 2) % 4}.{module}.weight").double()
        dropped, _ = _numpy_whitened_optimum((w - (w + partner) / 2).numpy(), x.T.numpy(), rank, 0.01)
        err_act = ((w - act.value(name).double()) @ x.T).norm().item()
        err_plain = ((w - plain.value(name).double()) @ x.T).norm().item()
        assert err_act < err_plain
        assert stats[(layer, module + ".weight")]["error"] == pytest.approx(dropped, rel=1e-3)
        # the damped optimum is within the damping of the undamped output error
        assert err_act == pytest.approx(dropped, rel=0.05)


def test_op_at_full_rank_is_the_original_model(model):
    g = apply(_graph(model), _calib_params(model, rank=FULL), Context())
    src = _graph(model)
    for name in src.names():
        assert torch.allclose(g.value(name).float(), src.value(name).float(), atol=1e-4), name
