"""Erase's prompt embeddings come from the CLIP text encoder run on the model engine as an encoder-only stack
(issue 18): equal to the whole transformers module, one block resident at a time, the graph's current tensors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from surgeon.ops.erase.sd_keys import detect_layout
from surgeon.ops.erase.text import PromptEncoder, clip_text_stack
from test_erase_helpers import save_compvis_copy, save_tiny_sd

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph
from surgeon.sources import open_checkpoint

PROMPTS = ["nudity", "a red cat", "painting by van gogh", "", "the blue house of a dog"]
TOL = 1e-6  # max |engine − module| / max |module|: the same fp32 operations, blocks run apart


def _whole_module_reference(folder, prompts, *, hidden_index=None, change=None):
    """last_hidden_state (or hidden_states[hidden_index]) of the transformers module loaded whole, float64."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    if change is not None:
        change(model)
    with torch.no_grad():
        out = model(ids, output_hidden_states=hidden_index is not None)
    h = out.last_hidden_state if hidden_index is None else out.hidden_states[hidden_index]
    return h.double(), ids


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL * float(b.abs().max())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("erase-engine") / "tiny-sd")


def test_prompt_embeddings_equal_the_whole_text_encoder_in_both_layouts(sd, tmp_path):
    ref, _ = _whole_module_reference(sd, PROMPTS)
    ctx = Context(quiet=True)
    g = Graph.from_checkpoint(open_checkpoint(sd))
    enc = PromptEncoder(g, detect_layout(g, ctx), batch_size=2, ctx=ctx)  # 3 micro-batches, the last short
    got = enc.encode(PROMPTS)
    assert got.hidden.shape == ref.shape and got.hidden.dtype == torch.float64
    assert _close(got.hidden, ref)
    assert got.lengths == [2 + len(p.split()) for p in PROMPTS]  # BOS + words + EOS (one token per word here)
    gram = enc.gram(PROMPTS)  # Σ h hᵀ over every prompt and position, per micro-batch
    rows = ref.reshape(-1, ref.shape[-1])
    assert float((gram - rows.T @ rows).abs().max()) <= 1e-5 * float((rows.T @ rows).abs().max())

    single = save_compvis_copy(sd, tmp_path / "sd.safetensors")  # cond_stage_model.transformer.* names
    gc = Graph.from_checkpoint(open_checkpoint(single))
    layout = detect_layout(gc, Context(quiet=True), str(sd))
    got_c = PromptEncoder(gc, layout, ctx=Context(quiet=True)).encode(PROMPTS)
    assert _close(got_c.hidden, ref)


def test_encoder_stack_holds_one_block_at_a_time_and_reads_the_graph_lazily(sd):
    ctx = Context(quiet=True)
    g = Graph.from_checkpoint(open_checkpoint(sd))
    spec = detect_layout(g, ctx).encoders[0]
    stack = clip_text_stack(g, spec, micro_batch=2)
    resident = []

    def count(module, args):  # block calls (the embedding pass also reaches block 0's hooks, unloaded)
        if module.mlp.fc1.weight.device.type != "meta":
            resident.append(sum(1 for lp in stack.paths.layers
                                if stack.module.get_submodule(lp).mlp.fc1.weight.device.type != "meta"))

    hooks = [stack.module.get_submodule(lp).register_forward_pre_hook(count) for lp in stack.paths.layers]
    _, ids = _whole_module_reference(sd, PROMPTS[:3])
    out = torch.cat(list(stack.outputs(ids))).double()
    for h in hooks:
        h.remove()
    assert resident == [1] * (stack.n_layers * 2)  # each block, 2 micro-batches, ran with only itself loaded
    assert all(p.device.type == "meta" for lp in stack.paths.layers
               for p in stack.module.get_submodule(lp).parameters())  # and was put back afterwards

    # hidden_states[-2] (SDXL's penultimate layer): every block but the last, no final norm
    ref_pen, _ = _whole_module_reference(sd, PROMPTS[:3], hidden_index=-2)
    assert _close(torch.cat(list(stack.outputs(ids, blocks=stack.n_layers - 1))).double(), ref_pen)

    # an earlier step's change in the graph is what the stack runs (lazy read per block)
    name = spec.state_names(g.names())["encoder.layers.1.mlp.fc2.weight"]
    g.replace(name, Const(g.value(name) * 3.0))
    changed = torch.cat(list(clip_text_stack(g, spec).outputs(ids))).double()

    def triple(model):
        with torch.no_grad():
            model.get_submodule("encoder.layers.1.mlp.fc2").weight.mul_(3.0)

    ref_changed, _ = _whole_module_reference(sd, PROMPTS[:3], change=triple)
    assert not _close(out, ref_changed) and _close(changed, ref_changed)


def test_missing_text_encoder_tensor_is_named(sd):
    ctx = Context(quiet=True)
    g = Graph.from_checkpoint(open_checkpoint(sd))
    spec = detect_layout(g, ctx).encoders[0]
    g.remove(spec.state_names(g.names())["encoder.layers.1.self_attn.k_proj.weight"])
    with pytest.raises(SurgeonError, match=r"text_encoder/(text_model\.)?encoder\.layers\.1\.self_attn\.k_proj"):
        clip_text_stack(g, spec)
