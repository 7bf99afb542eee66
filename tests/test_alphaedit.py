"""AlphaEdit (arXiv 2410.02355): the null-space projector and the projected update against literal numpy ports of
the authors' code (``experiments/evaluate.py`` ``get_project``, ``AlphaEdit_main.py``'s solve), the cache, and
sequential batches on the tiny fact model of ``tests/test_edit.py``."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_edit import FILLER, OBJECTS, SUBJECTS, TEMPLATES, _answers, _request, _train_fact_model


# ------------------------------------------------------------------------------------------- the oracles
def _reference_projector(cov: np.ndarray, threshold: float) -> np.ndarray:
    """``get_project``: SVD of the covariance, singular vectors with singular value below the threshold."""
    u, s, _ = np.linalg.svd(cov, full_matrices=False)
    small = np.nonzero(s < threshold)[0]
    return u[:, small] @ u[:, small].T


def _reference_update(keys, resid, proj, cache_c, l2):
    """``apply_AlphaEdit_to_model``'s solve: upd = solve(P(KKᵀ + cache_c) + L2·I, P K Rᵀ) in [d_k, d_out]; the
    Linear weight gets its transpose."""
    d_k = keys.shape[0]
    upd = np.linalg.solve(proj @ (keys @ keys.T + cache_c) + l2 * np.eye(d_k), proj @ keys @ resid.T)
    return upd.T


def _preserved(d_k=24, n0=16, seed=0):
    rng = np.random.default_rng(seed)
    k0 = rng.normal(size=(d_k, n0))  # rank n0 < d_k: a null space of d_k - n0 dimensions
    return k0, k0 @ k0.T / n0


def test_projector_matches_the_reference_and_kills_preserved_keys():
    from surgeon.ops.edit.nullspace import nullspace_basis, projector

    k0, cov = _preserved()
    basis, vals = nullspace_basis(torch.from_numpy(cov), 2e-2)
    p = projector(basis).numpy()
    assert basis.shape[1] == 24 - 16
    np.testing.assert_allclose(p, _reference_projector(cov, 2e-2), atol=1e-10)
    assert np.abs(p @ k0).max() < 1e-10  # P K₀ = 0
    np.testing.assert_allclose(p @ p, p, atol=1e-12)  # idempotent
    np.testing.assert_allclose(p, p.T, atol=1e-12)  # symmetric
    np.testing.assert_allclose(np.sort(vals.numpy()), np.sort(np.linalg.eigvalsh(cov)), atol=1e-10)


def test_projected_update_is_the_reference_closed_form():
    from surgeon.ops.edit.nullspace import nullspace_basis, projected_update, projector

    rng = np.random.default_rng(1)
    k0, cov = _preserved()
    proj = projector(nullspace_basis(torch.from_numpy(cov), 2e-2)[0]).numpy()
    keys, resid = rng.normal(size=(24, 3)), rng.normal(size=(10, 3))
    earlier = rng.normal(size=(24, 4))
    cache_c = earlier @ earlier.T
    for l2 in (10.0, 0.5):
        up, down = projected_update(torch.from_numpy(resid), torch.from_numpy(keys), torch.from_numpy(proj),
                                    torch.from_numpy(cache_c), l2)
        assert up.shape == (10, 3) and down.shape == (3, 24)
        delta = (up @ down).numpy()
        np.testing.assert_allclose(delta, _reference_update(keys, resid, proj, cache_c, l2), rtol=1e-9, atol=1e-11)
        assert np.abs(delta @ k0).max() < 1e-9  # outputs of the preserved keys do not move
    # a small α and no earlier keys: the projected keys are written almost exactly (ΔW PK ≈ R when n ≤ rank P)
    up, down = projected_update(torch.from_numpy(resid), torch.from_numpy(proj @ keys), torch.from_numpy(proj),
                                torch.zeros(24, 24, dtype=torch.float64), 1e-8)
    np.testing.assert_allclose((up @ down).numpy() @ (proj @ keys), resid, atol=1e-5)


# ---------------------------------------------------------------------------------------- the fact model
@pytest.fixture(scope="module")
def fact_model(tmp_path_factory) -> Path:
    return _train_fact_model(tmp_path_factory.mktemp("facts") / "model")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))


def _kept_text(path: Path) -> str:
    """Preserved knowledge K₀: filler and the facts of the subjects that are not edited (16..23)."""
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        i = rng.randrange(16, 24)
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randrange(2, 8)))
        lines.append(f"{filler} . {rng.choice(TEMPLATES).format(SUBJECTS[i])} {OBJECTS[i]} .")
    path.write_text("\n\n".join(lines))
    return str(path)


def _edits(n: int) -> list[dict]:
    return [_request(i, (i + 5) % 24, neighborhood=[TEMPLATES[0].format(SUBJECTS[16 + i % 8])]) for i in range(n)]


def _sequential_problem(seed=2, d_k=24, d_out=10, rank0=12, n0=400, batches=4, per=2):
    """A linear layer, preserved keys in a ``rank0``-dimensional subspace (plus small noise) and ``batches``
    sequential batches of edit keys with random target values."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=torch.float64))[0]
    k0 = basis[:, :rank0] @ torch.randn(rank0, n0, generator=g, dtype=torch.float64) * 2
    k0 = k0 + 1e-3 * torch.randn(d_k, n0, generator=g, dtype=torch.float64)
    w0 = torch.randn(d_out, d_k, generator=g, dtype=torch.float64)
    ks = [torch.randn(d_k, per, generator=g, dtype=torch.float64) for _ in range(batches)]
    vs = [w @ k + 3 * torch.randn(d_out, per, generator=g, dtype=torch.float64) for w, k in zip([w0] * batches, ks)]
    return w0, k0, ks, vs


def test_sequential_alphaedit_keeps_earlier_batches_and_preserved_keys_better():
    """Four sequential batches on a linear layer: after the last, the first batch's keys still map to their values,
    unlike sequential MEMIT (ridge λC) and EMMET (λ′ = 0.1), which write each batch exactly but undo earlier
    ones; the preserved keys' outputs stay put (MEMIT's C-metric also protects them: comparable drift)."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.nullspace import nullspace_basis, projected_update, projector
    from surgeon.ops.edit.solve import emmet_update, ridge_factors

    w0, k0, ks, vs = _sequential_problem()
    cov = k0 @ k0.T / k0.shape[1]
    proj = projector(nullspace_basis(cov, 2e-2)[0])
    factor = CholeskyFactor(cov)

    def run(step):
        w, previous = w0.clone(), torch.zeros_like(cov)
        for k, v in zip(ks, vs):
            up, down = step(w, k, v, previous)
            w = w + up @ down
            previous = previous + k @ k.T
        first = ((w @ ks[0] - vs[0]).norm() / (w0 @ ks[0] - vs[0]).norm()).item()
        drift = ((w - w0) @ k0).norm().item() / (w0 @ k0).norm().item()
        return first, drift

    alpha = run(lambda w, k, v, prev: projected_update(v - w @ k, k, proj, prev, 0.1))
    memit = run(lambda w, k, v, prev: ridge_factors(v - w @ k, k, factor, 1.0))
    emmet = run(lambda w, k, v, prev: emmet_update(w, k, v, factor, 0.1))
    assert alpha[0] < 0.1  # the first batch still holds after three more (measured 0.044)
    assert alpha[0] < 0.25 * min(memit[0], emmet[0])  # sequential MEMIT / EMMET: 0.62 of the first residual back
    assert alpha[1] < 2e-3  # the preserved keys' outputs barely move (P K₀ ≈ 0 up to the keys' noise)


def test_alphaedit_sequential_batches_on_the_fact_model(fact_model, tmp_path):
    """edit.alphaedit, 12 edits in 3 sequential batches over both layers, C from text about the other subjects:
    every batch holds after the last, the untouched facts are kept, only the two down-projections change, and
    the factors in edits.safetensors undo the edit exactly."""
    from safetensors.torch import load_file

    from surgeon.api import run_op

    stats = _kept_text(tmp_path / "kept.txt")
    out = tmp_path / "edited"
    res = run_op("edit.alphaedit", str(fact_model), output=str(out), device="cpu", requests=_edits(12),
                 stats_data=stats, n_prefixes=2, layers=[0, 1], batch_size=4)
    info = res["steps"][0]["info"]
    assert info["batches"] == 3 and [len(h["batches"]) for h in info["batch_history"]] == [1, 2, 3]
    assert all(0 < x["nullspace_dim"] < 256 and x["projector"] == "computed" for x in info["nullspace"])
    metrics = res["results"][-1]
    assert metrics["batch_efficacy"] == [1.0, 1.0, 1.0] and metrics["first_batch_efficacy"] == 1.0
    assert metrics["neighborhood"] == 1.0
    got = _answers(out, [TEMPLATES[0].format(s) for s in SUBJECTS])
    assert got[:12] == [OBJECTS[(i + 5) % 24] for i in range(12)]
    assert got[16:] == OBJECTS[16:]  # the preserved facts
    before, after = load_file(fact_model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    undo = load_file(out / "edits.safetensors")
    for k in changed:
        torch.testing.assert_close(before[k] + undo[k + ".up"] @ undo[k + ".down"], after[k])
    # a second run reads the projectors from the cache (keyed by the statistics and the threshold) ...
    again = run_op("edit.alphaedit", str(fact_model), output=str(tmp_path / "again"), device="cpu",
                   requests=_edits(1), stats_data=stats, n_prefixes=0, layers=[0, 1], steps=1, metrics=False)
    assert [x["projector"] for x in again["steps"][0]["info"]["nullspace"]] == ["cache", "cache"]
    # ... and another threshold is another entry
    other = run_op("edit.alphaedit", str(fact_model), output=str(tmp_path / "other"), device="cpu",
                   requests=_edits(1), stats_data=stats, n_prefixes=0, layers=[0, 1], steps=1, metrics=False,
                   nullspace_threshold=1e-3)
    dims = [x["nullspace_dim"] for x in other["steps"][0]["info"]["nullspace"]]
    assert [x["projector"] for x in other["steps"][0]["info"]["nullspace"]] == ["computed", "computed"]
    assert all(d < x["nullspace_dim"] for d, x in zip(dims, info["nullspace"]))


def test_threshold_below_every_eigenvalue_is_refused(fact_model, tmp_path):
    from surgeon.api import run_op
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match="nullspace-threshold"):
        run_op("edit.alphaedit", str(fact_model), output=str(tmp_path / "o"), device="cpu", requests=_edits(1),
               stats_data=_kept_text(tmp_path / "kept.txt"), layers=[1], nullspace_threshold=1e-30, metrics=False)


def test_alphaedit_records_its_requests_for_later_steps(fact_model, tmp_path):
    """Like every edit op, AlphaEdit records its requests and name in the graph, so a later prune protects the
    edit and PERP's edit loss sees its facts (surgeon.edits)."""
    from surgeon.ops.edit import alphaedit

    from surgeon.context import Context
    from surgeon.edits import edit_records, edit_requests
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(str(fact_model)))
    reqs = _edits(2)
    out = alphaedit.apply(g, alphaedit.Params(requests=reqs, stats_data=_kept_text(tmp_path / "kept.txt"),
                                              n_prefixes=0, layers=[0, 1], steps=1, metrics=False), Context())
    records = edit_records(out)
    assert sorted(r.tensor for r in records) == ["model.layers.0.mlp.down_proj.weight",
                                                 "model.layers.1.mlp.down_proj.weight"]
    assert {r.op for r in records} == {"edit.alphaedit"}
    got = edit_requests(out)
    assert len(got) == 2 * len(reqs)  # each edited tensor carries the batch's requests
    assert {(r["prompt"], r["target"]) for r in got} == {(r["prompt"], r["target"]) for r in reqs}
