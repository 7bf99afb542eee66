"""End-to-end PERP under two ``torchrun``-style gloo processes shards the model with FSDP2 (issue 18): each rank
trains on half of every batch and the averaged gradients make the same steps as one process on the whole batch."""
from __future__ import annotations

from pathlib import Path

import torch

PARAMS = {"steps": 3, "batch_size": 4, "seqlen": 16, "max_windows": 8, "lr": 1e-3, "rank": 4}


def _perp(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors PERP's retrain mode changed (merged MaskLoRA weights, norms) and its report."""
    from surgeon.ops.retrain.perp import Params, apply

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(str(folder)))
    ctx = Context(quiet=True, seed=0)
    g2 = apply(g, Params(data=str(folder / "calib.txt"), **PARAMS), ctx)
    out = {n: g2.value(n) for n in g2.names() if not torch.equal(g2.value(n), g.value(n))}
    out["fsdp_processes"] = torch.tensor(ctx.step_info.get("fsdp_processes", 1))
    out["loss_first"] = torch.tensor(ctx.step_info["loss_first"])  # rank 0's own loss
    return out


def test_two_gloo_processes_train_perp_like_one_with_fsdp2(tmp_path):
    from conftest import run_on_gloo_ranks, save_tiny_llama_with_tokenizer, word_text

    folder = save_tiny_llama_with_tokenizer(tmp_path / "m", layers=2)
    (folder / "calib.txt").write_text(word_text(600, seed=3))
    torch.set_num_threads(1)
    one = _perp(folder)
    out = tmp_path / "rank0.pt"
    two = run_on_gloo_ranks(_perp, folder, out)
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(str(folder)))
    base = {n: g.value(n) for n in g.names()}
    assert int(one.pop("fsdp_processes")) == 1 and int(two.pop("fsdp_processes")) == 2
    # rank 0 saw only its half of each batch (its loss differs) yet made the whole batch's steps (below)
    assert float(two.pop("loss_first")) != float(one.pop("loss_first"))
    assert set(one) == set(two) and len(one) >= 2 * 7  # every block linear (and norms) trained
    for n in one:
        # fp32 sums in another order (two half-batch means averaged, then Adam): equal to 1e-5 of the update
        step = float((one[n].double() - two[n].double()).abs().max())
        assert step <= 1e-5 * max(1.0, float(one[n].abs().max())), (n, step)
        assert step < 0.01 * float((one[n] - base[n]).abs().max()) or n.endswith("norm.weight"), n
