"""Edits survive the rest of a chain (issue #22 item 5): edit records in the graph, protection in pruning and
ShiftAdd, PERP's edit loss. Oracles: the edited fact read off a tiny model by argmax, least squares on the
kept entries written out per row, the edit NLL computed one prefix at a time."""
from __future__ import annotations

import pytest
import torch
from conftest import word_text
from surgeon.ops.prune import magnitude, wanda
from surgeon.ops.prune.protect import protected_entries, prune_smallest, refit_kept
from surgeon.ops.retrain import perp
from surgeon.ops.retrain.edit_loss import edit_batch, edit_nll

from surgeon.context import Context
from surgeon.edits import edit_deltas, edit_keys, edit_records, edit_requests, record_edit, resolve_protect
from surgeon.graph import Graph, LowRank
from surgeon.sources import open_checkpoint

LAYER = 1
EDITED = f"model.layers.{LAYER}.mlp.down_proj.weight"
PROMPT, TARGET = "w1 w2 w3 w4", " w57"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _key_and_direction(model, ids, target_id):
    """The down-projection input at the last prompt token, and the gradient of the target's log-prob with respect
    to that projection's output there (the direction a value edit pushes)."""
    mod = model.model.layers[LAYER].mlp.down_proj
    seen = {}

    def hook(m, args, out):
        seen["k"] = args[0][0, -1].detach().clone()
        out.retain_grad()
        seen["out"] = out
    h = mod.register_forward_hook(hook)
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[target_id]
    logp.backward()
    h.remove()
    return seen["k"], seen["out"].grad[0, -1].detach()


def _edited(path, margin=1.5):
    """A tiny Llama with a rank-one edit W += u kᵀ/‖k‖² at layer 1's down-projection, 1.5× the smallest scale of
    u that makes ``TARGET`` the greedy answer to ``PROMPT``, recorded like an edit op records it."""
    g = Graph.from_checkpoint(open_checkpoint(path))
    ctx = Context()
    model, tok = ctx.module(g), ctx.tokenizer(g)
    ids = tok(PROMPT)["input_ids"]
    tid = tok(PROMPT + TARGET)["input_ids"][len(ids)]
    k, d = _key_and_direction(model, ids, tid)
    w0 = g.value(EDITED).float()
    mod = model.model.layers[LAYER].mlp.down_proj

    def wins(scale):
        with torch.no_grad():
            mod.weight.copy_(w0 + torch.outer(scale * d / d.norm(), k / k.dot(k)))
        return int(_last_logits(model, ids).argmax()) == tid
    lo, hi = 0.0, 1.0
    while not wins(hi):
        hi *= 2
    for _ in range(20):
        lo, hi = (lo, (lo + hi) / 2) if wins((lo + hi) / 2) else ((lo + hi) / 2, hi)
    up = (margin * hi * d / d.norm())[:, None]
    down = (k / k.dot(k))[None, :]
    ge = g.copy()
    ge.replace(EDITED, LowRank(g[EDITED], up, down, label="edit"))  # as the edit ops write it
    record_edit(ge, tensor=EDITED, up=up, down=down, transposed=False, keys=k[:, None], op="test",
                requests=[{"prompt": PROMPT, "subject": "w1", "target": TARGET}])
    return ge, ids, tid


def _answer(graph, ids):
    return int(_last_logits(Context().module(graph), ids).argmax())


def test_records_travel_with_copies_and_resolve_the_default(tiny_llama_tok):
    g = Graph.from_checkpoint(open_checkpoint(tiny_llama_tok))
    assert not resolve_protect(None, g) and resolve_protect(True, g)
    up, down = torch.randn(128, 2), torch.randn(2, 256)
    record_edit(g, tensor=EDITED, up=up, down=down, transposed=True, requests=[{"prompt": "a", "target": " b"}],
                op="edit.x")
    c = g.copy().copy()
    (rec,) = edit_records(c)
    assert rec.tensor == EDITED and rec.op == "edit.x" and edit_requests(c) == [{"prompt": "a", "target": " b"}]
    assert torch.allclose(edit_deltas(c)[EDITED], (up @ down).T, atol=1e-5)  # storage layout of a transposed tensor
    assert torch.equal(edit_keys(c)[EDITED], down.T)  # no keys recorded: the rows of down stand in
    assert resolve_protect(None, c) and not resolve_protect(False, c)


def test_refit_matches_per_row_least_squares_and_keeps_zeros():
    torch.manual_seed(0)
    w, keys = torch.randn(6, 20, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    pruned = w * (torch.rand(6, 20) > 0.5)
    out = refit_kept(pruned.float(), w.float(), keys.float(), ridge=0.0).double()
    for r in range(6):  # oracle: minimum-norm solution of K_Sᵀ δ = (w_r − ŵ_r)K on the kept entries S
        s = pruned[r] != 0
        delta = torch.linalg.lstsq(keys[s].T, (w[r] - pruned[r]) @ keys, driver="gelsd").solution
        expect = pruned[r].clone()
        expect[s] += delta
        assert torch.allclose(out[r], expect, atol=1e-4)
    assert torch.equal(out == 0, pruned == 0)
    assert torch.allclose(out @ keys, w @ keys, atol=1e-3)


def test_entries_mode_ranks_the_edit_last_and_keeps_the_count():
    torch.manual_seed(0)
    w, delta = torch.randn(8, 16), torch.zeros(8, 16)
    delta[2, 3], delta[5, 7] = 1e-3, -2e-3  # tiny entries: magnitude alone would prune them first
    w[2, 3], w[5, 7] = 1e-4, 1e-4
    mask = protected_entries(delta, 2 / 128)
    assert int(mask.sum()) == 2 and mask[2, 3] and mask[5, 7]
    out = prune_smallest(w, 64, mask)
    assert int((out == 0).sum()) == 64 and out[2, 3] != 0 and out[5, 7] != 0


def test_pruning_keeps_the_edited_fact_only_with_protection(tiny_llama_tok):
    ge, ids, tid = _edited(tiny_llama_tok, margin=1.1)  # 10 % above the smallest edit that flips the answer
    assert _answer(ge, ids) == tid
    kw = {"sparsity": 0.7, "include": [EDITED]}
    ctx = Context()
    kept = magnitude.apply(ge, magnitude.Params(**kw), ctx)  # on by default: the graph carries an edit
    assert ctx.step_info["protect_edits"] is True
    lost = magnitude.apply(ge, magnitude.Params(**kw, protect_edits=False), Context())
    assert _answer(kept, ids) == tid
    assert _answer(lost, ids) != tid
    a, b = kept.value(EDITED), lost.value(EDITED)
    assert int((a == 0).sum()) == int((b == 0).sum()) == int(0.7 * a.numel())  # same exact sparsity
    k = edit_keys(ge)[EDITED]
    assert torch.allclose(a.float() @ k, ge.value(EDITED).float() @ k, rtol=1e-4, atol=1e-4)


def test_wanda_keeps_the_edited_fact_only_with_protection(tiny_llama_tok, tmp_path):
    ge, ids, tid = _edited(tiny_llama_tok, margin=1.1)
    data = tmp_path / "text.txt"
    data.write_text(word_text(800))
    kw = {"sparsity": 0.7, "include": [EDITED], "data": str(data), "seqlen": 24, "n_windows": 8}
    kept = wanda.apply(ge, wanda.Params(**kw), Context())
    lost = wanda.apply(ge, wanda.Params(**kw, protect_edits=False), Context())
    assert _answer(kept, ids) == tid and _answer(lost, ids) != tid
    k, w = edit_keys(ge)[EDITED], ge.value(EDITED).float()
    err = {name: float((g.value(EDITED).float() @ k - w @ k).norm() / (w @ k).norm()) for name, g in
           (("kept", kept), ("lost", lost))}
    assert err["kept"] < 1e-4 and err["lost"] > 0.05  # Wanda alone moves the edited key's output; refit does not
    assert int((kept.value(EDITED) == 0).sum()) == int((lost.value(EDITED) == 0).sum())


def test_no_edit_no_change(tiny_llama_tok):
    g = Graph.from_checkpoint(open_checkpoint(tiny_llama_tok))
    a = magnitude.apply(g, magnitude.Params(sparsity=0.5), Context())
    b = magnitude.apply(g, magnitude.Params(sparsity=0.5, protect_edits=True), Context())  # nothing to protect
    for n in a.names():
        assert torch.equal(a.value(n), b.value(n))


def test_edit_nll_and_its_gradient_match_a_prefix_by_prefix_computation(tiny_llama_tok):
    g = Graph.from_checkpoint(open_checkpoint(tiny_llama_tok))
    ctx = Context()
    model, tok = ctx.module(g), ctx.tokenizer(g)
    requests = [{"prompt": "w1 w2 w3", "target": " w9 w10"}, {"prompt": "w4 w5 w6 w7 w8", "target": " w11"}]
    param = model.model.layers[0].mlp.up_proj.weight
    param.requires_grad_(True)
    loss = edit_nll(model, edit_batch(tok, requests))
    (grad,) = torch.autograd.grad(loss, param)
    literal = 0.0
    for r in requests:  # oracle: one forward pass per target token, on exactly the tokens before it
        p = tok(r["prompt"])["input_ids"]
        t = tok(r["prompt"] + r["target"])["input_ids"][len(p):]
        nll = 0.0
        for j, tid in enumerate(t):
            logits = model(input_ids=torch.tensor([p + t[:j]])).logits[0, -1]
            nll = nll - torch.log_softmax(logits, -1)[tid]
        literal = literal + nll / len(t) / len(requests)
    (grad_lit,) = torch.autograd.grad(literal, param)
    assert float(loss.detach()) == pytest.approx(float(literal.detach()), rel=1e-5)
    assert torch.allclose(grad, grad_lit, rtol=1e-4, atol=1e-7)


def test_perp_edit_loss_is_on_by_default_and_keeps_the_fact(tiny_llama_tok, tmp_path):
    ge, ids, tid = _edited(tiny_llama_tok)
    data = tmp_path / "text.txt"
    data.write_text(word_text(800))
    pruned = magnitude.apply(ge, magnitude.Params(sparsity=0.5, protect_edits=False), Context())
    kw = {"data": str(data), "steps": 20, "batch_size": 4, "seqlen": 24, "lr": 5e-3}
    ctx = Context()
    on = perp.apply(pruned, perp.Params(**kw), ctx)
    assert ctx.step_info["edit_loss"] is True and ctx.step_info["edit_requests"] == 1
    off = perp.apply(pruned, perp.Params(**kw, edit_loss=False), Context())
    lp = {}
    for name, graph in (("on", on), ("off", off)):
        logits = _last_logits(Context().module(graph), ids)
        lp[name] = float(torch.log_softmax(logits, -1)[tid])
    assert lp["on"] > lp["off"]
    assert _answer(on, ids) == tid


def test_shiftadd_keeps_the_edited_matrix_dense(tiny_llama_tok):
    from surgeon.ops.shiftadd import op as shiftadd

    g = Graph.from_checkpoint(open_checkpoint(tiny_llama_tok))
    ge = g.copy()
    up, down = torch.randn(64, 1), torch.randn(1, 128)
    ge.replace(EDITED, LowRank(g[EDITED], up, down, label="edit"))
    record_edit(ge, tensor=EDITED, up=up, down=down, transposed=False, op="test", requests=[])
    params = {"bits": 2, "group_size": 32, "rounds": 2, "weight_only": True}
    ctx = Context()
    kept = shiftadd.apply(ge, shiftadd.Params(**params), ctx)
    plain = shiftadd.apply(ge, shiftadd.Params(**params, protect_edits=False), Context())
    prefix = EDITED[: -len(".weight")]
    assert ctx.step_info["kept_dense_for_edits"] == [EDITED]
    assert torch.equal(kept.value(EDITED), ge.value(EDITED)) and f"{prefix}.qweight" not in kept
    assert f"{prefix}.qweight" in plain and EDITED not in plain
    assert prefix not in kept.config["quantization_config"]["modules"]
    other = "model.layers.0.mlp.down_proj"
    assert torch.equal(kept.value(f"{other}.qweight"), plain.value(f"{other}.qweight"))
