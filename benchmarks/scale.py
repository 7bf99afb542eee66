"""Real-size memory benchmark: a Llama-3-8B-shaped random bf16 checkpoint through the block-by-block engine.

Builds the checkpoint itself (32 layers, hidden 4096, MLP 14336, 32 heads, 8 kv heads, vocab 128256; ~15 GB
in bf16) under ``--cache`` and reuses it when present; ``--layers N`` builds a shallower copy of the same shape
(memory per block is the same; time scales with depth). A word-level tokenizer (1000 words) is saved with it,
so the calibration / evaluation text is random words. Then runs, each in its own process under
``/usr/bin/time -v``:

- ``surgeon eval CKPT --perplexity TEXT --seqlen 256 --max-windows 4``
- ``surgeon prune wanda CKPT --sparsity 0.5 --seqlen 256 --n-windows 8 -o OUT`` (output removed afterwards)
- ``surgeon edit rome CKPT --requests R --stats-data TEXT --stats-tokens N --steps S --no-metrics
  --n-prefixes 0 -o OUT`` twice: at the last layer (statistics run every block; v* holds one block) and at the
  default layer (v* holds blocks l..L−1 resident); ``--stats-tokens`` / ``--edit-steps`` keep it short

- ``surgeon shiftadd CKPT --data TEXT --seqlen 256 --max-windows 8 --layers 0,1 --rounds 4 -o OUT`` (calibrated 3-bit,
  blocks 0 and 1 only: the engine runs no further; output removed afterwards)

and prints wall seconds, peak RSS and the engine's seconds per block. Goal: peak RSS <= 4 GB.

    .venv/bin/python benchmarks/scale.py [--layers 32] [--only eval|wanda|edit|rome|shiftadd] [--cache DIR]
        [--stats-tokens 2048] [--edit-steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 128256, "num_hidden_layers": 32}
WORDS = 1000


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE, "num_hidden_layers": layers,
            "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}


def build(folder: Path, layers: int) -> Path:
    """Write the random checkpoint (one shard per layer, embeddings and head apart) unless it is complete."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").exists():
        return folder
    need = 2 * (2 * SHAPE["vocab_size"] * 4096 + layers * 218_112_000)
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.home()).free
    if free < need * 1.1:
        sys.exit(f"scale: {need / 1e9:.1f} GB needed for the checkpoint, {free / 1e9:.1f} GB free")
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    h, f, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], 8 * 128
    weight_map = {}

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(SHAPE["vocab_size"], h)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"layer-{i:02d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        print(f"  built layer {i + 1}/{layers}", file=sys.stderr)
    shard("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                               "lm_head.weight": rand(SHAPE["vocab_size"], h)})
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
    save_tokenizer(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *(f"w{i}" for i in range(WORDS))])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def text_file(path: Path, n_words: int = 6000) -> Path:
    import random

    rnd = random.Random(0)
    lines = [" ".join(f"w{rnd.randrange(WORDS)}" for _ in range(12)) for _ in range(n_words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS (GB) and the JSON the command printed."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout)
    return {"wall_s": round(wall, 1), "peak_rss_gb": int(m.group(1)) * 1024 / 1e9 if m else None, "json": out}


def block_info(out: dict) -> dict:
    for step in out.get("steps", []):
        info = step.get("info", {})
        if "engine_block_s_mean" in info:
            return {k: info[k] for k in ("engine_blocks", "engine_block_s_mean", "engine_block_s_max")}
    return {}


STATS_ONLY = """
import json, sys, time
from surgeon.context import Context
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint
from surgeon.ops.edit.site import locate
from surgeon.ops.edit.stats import key_statistics
g = Graph.from_checkpoint(open_checkpoint(sys.argv[1]))
ctx = Context(quiet=True, device="cpu")
site = locate(g, int(sys.argv[4]), ctx.roles(g))
t0 = time.perf_counter()
st = key_statistics(g, ctx, site, spec=sys.argv[2], n_tokens=int(sys.argv[3]), seqlen=256, use_cache=False)
print(json.dumps({"stats_s": round(time.perf_counter() - t0, 1), "tokens": st.count, "layer": site.layer}))
"""


def edit_rows(cli: list[str], ckpt: Path, text: Path, tmp: Path, args, *, rome_only: bool = False) -> list[tuple]:
    """The edit's key statistics alone (E[kkᵀ] at the last layer: every block runs), then ``edit rome`` at the
    last layer and at the default layer (``rome_only``: ``edit rome`` at the default layer, once)."""
    rows = []
    if not rome_only:
        r = measure([sys.executable, "-c", STATS_ONLY, str(ckpt), str(text), str(args.stats_tokens),
                     str(args.layers - 1)])
        rows.append(("edit statistics (last layer)", r, {}, f"{r['json']['tokens']} tokens, {r['json']['stats_s']} s"))
    req = tmp / "requests.jsonl"
    req.write_text(json.dumps({"prompt": "w1 w2 w3 w4 w5 w6 is", "subject": "w3 w4", "target": " w7"}) + "\n")
    runs = (("default layer", []),) if rome_only else (("last layer", [str(args.layers - 1)]), ("default layer", []))
    for label, layer in runs:
        out = tmp / "edited"
        r = measure([*cli, "edit", "rome", str(ckpt), "--requests", str(req), "--stats-data", str(text),
                     "--stats-tokens", str(args.stats_tokens), "--no-stats-cache", "--steps", str(args.edit_steps),
                     "--no-metrics", "--n-prefixes", "0", *(["--layer", *layer] if layer else []),
                     "--device", "cpu", "-o", str(out), "--json"])
        info = r["json"]["steps"][0]["info"]
        t = info.get("timings_s", {})
        note = (f"layer {info['layer']}, stats {t.get('stats_s', 0):.0f} s, v* {t.get('keys_values_s', 0):.0f} s "
                f"({info['edits'][0]['value_steps']} steps)")
        rows.append((f"edit rome ({label})", r, {}, note))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", choices=["eval", "wanda", "edit", "rome", "shiftadd"], default=None,
                    help="one benchmark; rome: `edit rome` at the default layer only (no statistics-only run)")
    ap.add_argument("--stats-tokens", type=int, default=2048, help="tokens for the edit's key statistics")
    ap.add_argument("--edit-steps", type=int, default=5, help="Adam steps of the edit's value optimisation")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "surgeon" / "bench")
    args = ap.parse_args()
    name = "llama8b-shape" if args.layers == 32 else f"llama8b-shape-{args.layers}l"
    t0 = time.perf_counter()
    ckpt = build(args.cache / name, args.layers)
    print(f"checkpoint: {ckpt} ({time.perf_counter() - t0:.0f} s to build or find)")
    cli = [sys.executable, "-m", "surgeon.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="surgeon-scale-", dir=args.cache) as tmp:
        text = text_file(Path(tmp) / "words.txt")
        if args.only in (None, "eval"):
            r = measure([*cli, "eval", str(ckpt), "--perplexity", str(text), "--seqlen", "256", "--max-windows",
                         "4", "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--json"])
            res = r["json"]["results"][-1]
            rows.append(("eval --perplexity (4x256)", r, block_info(r["json"]), f"ppl {res['perplexity']:.1f}"))
        if args.only in (None, "wanda"):
            out = Path(tmp) / "pruned"
            r = measure([*cli, "prune", "wanda", str(ckpt), "--data", str(text), "--sparsity", "0.5", "--seqlen",
                         "256", "--n-windows", "8", "--batch-size", "8", "--device", "cpu", "-o", str(out),
                         "--json"])
            rows.append(("prune wanda 0.5 (8x256)", r, block_info(r["json"]), ""))
            shutil.rmtree(out, ignore_errors=True)
        if args.only in (None, "edit", "rome"):
            rows += edit_rows(cli, ckpt, text, Path(tmp), args, rome_only=args.only == "rome")
        if args.only in (None, "shiftadd"):
            out = Path(tmp) / "shiftadd"
            r = measure([*cli, "shiftadd", str(ckpt), "--data", str(text), "--seqlen", "256", "--max-windows", "8",
                         "--layers", "0,1", "--rounds", "4", "--device", "cpu", "-o", str(out), "--json"])
            rows.append(("shiftadd 3-bit calib. 2 blocks", r, block_info(r["json"]), ""))
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nLlama-3-8B shape, {args.layers} layers, bf16 checkpoint, fp32 compute, "
          f"{os.cpu_count()} CPUs, torch threads default")
    print(f"{'run':<28} {'wall s':>8} {'peak RSS GB':>12} {'s/block':>8} {'blocks':>7}  note")
    for label, r, b, note in rows:
        print(f"{label:<28} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>12.2f} {b.get('engine_block_s_mean', 0):>8.1f} "
              f"{b.get('engine_blocks', 0):>7}  {note}")
    print("goal: peak RSS <= 4 GB")


if __name__ == "__main__":
    main()
