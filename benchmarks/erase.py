"""Benchmark: UCE + RECE epochs on synthetic SD1.4- and SDXL-shaped checkpoints (random weights, real shapes), CPU.

    .venv/bin/python benchmarks/erase.py                 # SD1.4 (float32 and float16) and SDXL (float16)
    .venv/bin/python benchmarks/erase.py --only sd14 --threads 2

Each synthetic pipeline has a real-shaped text encoder (CLIP ViT-L/14; SDXL adds OpenCLIP bigG as a 32-layer
CLIPTextModel) and a UNet holding every cross-attention ``attn2.to_{q,k,v,out}`` at its real shape (32 k/v
matrices 320/640/1280×768 for SD1.4, 140 matrices 640/1280×2048 for SDXL); the UNet's other tensors are left
out (``--full-unet-bytes`` adds one filler tensor of the real UNet's remaining size, to time the byte copy).

Printed per model: compute (UCE + Gram + RECE epochs + apply W·M, the issue's goal) as process CPU seconds with
one thread (the work, robust to a shared machine) and as wall seconds with ``--threads`` (median of ``--repeats``); text encoding; end-to-end
``run_op`` wall time including reading and writing; and the ratio against a baseline measured in the same run (CPU
seconds, one thread): the authors' per-matrix loop (``closed_form.rece_per_matrix``: per-layer normal equations and
explicit inverses, Σ W′ᵀW′ and Σ W′ᵀW re-summed every epoch) on the same weights and embeddings, UCE + 1 epoch.
Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SD14_UNET = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "block_out_channels": [320, 640, 1280,
             1280], "layers_per_block": 2, "attention_head_dim": 8, "sample_size": 64, "in_channels": 4,
             "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL_UNET = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048, "block_out_channels": [320, 640,
             1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block":
             [1, 2, 10], "addition_embed_type": "text_time", "sample_size": 128, "in_channels": 4, "out_channels": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
UNET_PARAMS = {"sd14": 859_520_964, "sdxl": 2_567_463_684}  # real parameter counts, for --full-unet-bytes


def cross_attention_blocks(kind: str) -> list[tuple[str, int]]:
    """(module path of each transformer block's attn2, its channel width) in diffusers order."""
    out = []
    if kind == "sd14":
        for i, ch in enumerate((320, 640, 1280)):
            out += [(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2", ch) for j in range(2)]
        out.append(("mid_block.attentions.0.transformer_blocks.0.attn2", 1280))
        for i, ch in zip((1, 2, 3), (1280, 640, 320)):
            out += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2", ch) for j in range(3)]
    else:
        for i, ch, depth in ((1, 640, 2), (2, 1280, 10)):
            out += [(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{b}.attn2", ch)
                    for j in range(2) for b in range(depth)]
        out += [(f"mid_block.attentions.0.transformer_blocks.{b}.attn2", 1280) for b in range(10)]
        for i, ch, depth in ((0, 1280, 10), (1, 640, 2)):
            out += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{b}.attn2", ch)
                    for j in range(3) for b in range(depth)]
    return out


def random_clip(folder: Path, cfg: dict, dtype: torch.dtype, with_projection: bool, seed: int) -> None:
    """Real-shaped random CLIP text encoder written tensor by tensor (no full random init of a module)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**cfg)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        if "norm" in name and name.endswith("weight"):
            t = torch.ones(p.shape)
        elif name.endswith("bias"):
            t = torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=g) * 0.02
        state[name] = t.to(dtype)
    if with_projection:
        state["text_projection.weight"] = (torch.randn(cfg["projection_dim"], cfg["hidden_size"], generator=g)
                                           * 0.02).to(dtype)
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": [arch]}))


def synthetic_pipeline(root: Path, kind: str, dtype: torch.dtype, full_unet_bytes: bool,
                       text_layers: int | None = None) -> Path:
    from safetensors.torch import save_file
    from test_erase_helpers import save_tiny_tokenizer

    g = torch.Generator().manual_seed(0)
    d = 768 if kind == "sd14" else 2048
    unet = {}
    for path, ch in cross_attention_blocks(kind):
        for proj, shape in (("to_q", (ch, ch)), ("to_k", (ch, d)), ("to_v", (ch, d)), ("to_out.0", (ch, ch))):
            unet[f"{path}.{proj}.weight"] = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype)
    if full_unet_bytes:
        rest = UNET_PARAMS[kind] - sum(t.numel() for t in unet.values())
        unet["filler.weight"] = torch.zeros(rest, dtype=dtype)
    (root / "unet").mkdir(parents=True)
    save_file(unet, root / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (root / "unet" / "config.json").write_text(json.dumps(SD14_UNET if kind == "sd14" else SDXL_UNET))
    depth = {} if text_layers is None else {"num_hidden_layers": text_layers}
    random_clip(root / "text_encoder", {**CLIP_L, **depth}, dtype, False, 1)
    save_tiny_tokenizer(root / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline" if kind == "sd14" else "StableDiffusionXLPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if kind == "sdxl":
        random_clip(root / "text_encoder_2", {**CLIP_BIGG, **depth}, dtype, True, 2)
        save_tiny_tokenizer(root / "tokenizer_2")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _compute(info: dict, key: str) -> float:
    t = info[key]
    return round(sum(t.get(k, 0.0) for k in ("uce", "gram", "rece_epochs", "apply")), 3)


def bench(kind: str, dtype: torch.dtype, work: Path, epochs: int, baseline_epochs: int, full_unet_bytes: bool,
          threads: int, text_layers: int | None = None, repeats: int = 3) -> dict:
    from surgeon.ops.erase.closed_form import rece_per_matrix, uce_edit_per_matrix
    from surgeon.ops.erase.rece import ReceParams, apply
    from surgeon.ops.erase.uce import prepare_erasure

    from surgeon.api import run_op
    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    tag = f"{kind}-{str(dtype).removeprefix('torch.')}"
    t0 = time.perf_counter()
    src = synthetic_pipeline(work / tag, kind, dtype, full_unet_bytes, text_layers)
    build_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in src.rglob("*.safetensors"))
    params = {"preset": "nudity", "epochs": epochs}
    g = Graph.from_checkpoint(open_checkpoint(src))

    # 1 thread: process CPU time = the work, whatever else the machine is doing
    torch.set_num_threads(1)
    ctx1 = Context(quiet=True)
    apply(g, ReceParams(**params), ctx1)
    # N threads: wall clock, the median of ``repeats`` runs (the first runs in a process pay for page faults and
    # thread start-up)
    torch.set_num_threads(threads)
    runs = []
    for _ in range(repeats):
        ctx = Context(quiet=True)
        apply(g, ReceParams(**params), ctx)
        runs.append(ctx.step_info)
    runs.sort(key=lambda i: _compute(i, "timings_s"))
    info = runs[len(runs) // 2]

    # end to end with N threads: open, encode, edit, write the folder
    t0 = time.perf_counter()
    run_op("erase.rece", str(src), output=str(work / f"{tag}-out"), device="cpu", **params)
    e2e = time.perf_counter() - t0

    row = {"model": tag, "matrices": info["matrices"], "checkpoint_MB": round(size / 1e6), "build_s": round(build_s),
           "matmul_dtype": info["matmul_dtype"], "written_as": info["written_as"], "edit_rank": info["edit_rank"],
           "cpu_1thread_s": ctx1.step_info["cpu_s"], "compute_cpu_1thread_s": _compute(ctx1.step_info, "cpu_s"),
           "wall_s": info["timings_s"], "compute_wall_s": _compute(info, "timings_s"),
           "compute_wall_s_all": [_compute(i, "timings_s") for i in runs], "end_to_end_s": round(e2e, 2)}
    if baseline_epochs:
        # baseline: the per-matrix loop on the same weights and embeddings (UCE + baseline_epochs), 1 thread CPU
        torch.set_num_threads(1)
        _, settings, emb = prepare_erasure(g, ReceParams(**params), Context(quiet=True))
        names = [n for n in g.names() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
        Ws = [g.value(n).to(torch.float64) for n in names]
        c0 = time.process_time()
        W1 = uce_edit_per_matrix(Ws, emb["C"], emb["T"], emb["P"], lam=0.5, eta_e=1.0, eta_p=1.0)
        rece_per_matrix(Ws, W1, emb["concepts_full"], emb["targets_full"], emb["rece_P"], epochs=baseline_epochs,
                        lam_r=settings["regularizer"], lam=0.1, eta_e=1.0, eta_p=0.1)
        base = time.process_time() - c0
        ctx2 = Context(quiet=True)
        apply(g, ReceParams(**{**params, "epochs": baseline_epochs}), ctx2)
        ours = _compute(ctx2.step_info, "cpu_s")
        row.update(baseline_epochs=baseline_epochs, baseline_cpu_1thread_s=round(base, 2),
                   ours_same_epochs_cpu_1thread_s=ours, speedup_vs_per_matrix=round(base / max(ours, 1e-9), 1))
        torch.set_num_threads(threads)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["sd14", "sdxl"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--baseline-epochs-sd14", type=int, default=1)
    ap.add_argument("--baseline-epochs-sdxl", type=int, default=0, help="0 = skip (140 inverses of 2048², slow)")
    ap.add_argument("--full-unet-bytes", action="store_true")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="text encoder depth (default: real, 12 / 32); 1 makes encoding cheap, compute is unchanged")
    ap.add_argument("--repeats", type=int, default=3, help="wall-clock runs per model; the median is reported")
    ap.add_argument("--workdir", default=None, help="where to build the synthetic checkpoints (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [("sd14", torch.float32), ("sd14", torch.float16), ("sdxl", torch.float16)]
    if args.only:
        runs = [r for r in runs if r[0] == args.only]
    with tempfile.TemporaryDirectory(prefix="surgeon-erase-bench-", dir=args.workdir) as tmp:
        rows = []
        for kind, dtype in runs:
            be = args.baseline_epochs_sd14 if kind == "sd14" else args.baseline_epochs_sdxl
            row = bench(kind, dtype, Path(tmp), args.epochs, be, args.full_unet_bytes, args.threads, args.text_layers,
                        args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    goal = {"sd14": 1.0, "sdxl": 30.0}
    load = os.getloadavg()[0]
    print(f"\nUCE + {args.epochs} RECE epochs; compute = UCE + Σ WᵀW + epochs + apply (no text encoding, no I/O); "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'model':14} {'mats':>4} {'CPU s (1 thr)':>13} {f'wall s ({args.threads} thr)':>14} {'goal s':>6} "
          f"{'e2e s':>6} {'baseline CPU s':>14} {'speedup':>8}")
    for r in rows:
        gl = goal[r["model"].split("-")[0]]
        b = f"{r['baseline_cpu_1thread_s']:.1f} ({r['baseline_epochs']} ep)" if "baseline_cpu_1thread_s" in r else "-"
        sp = f"{r['speedup_vs_per_matrix']:.1f}x" if "speedup_vs_per_matrix" in r else "-"
        print(f"{r['model']:14} {r['matrices']:>4} {r['compute_cpu_1thread_s']:>13.2f} {r['compute_wall_s']:>14.2f} "
              f"{gl:>6.1f} {r['end_to_end_s']:>6.1f} {b:>14} {sp:>8}")


if __name__ == "__main__":
    main()
