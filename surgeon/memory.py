"""Peak-memory estimate of a run, for ``--dry-run`` (no tensor is read).

A run's resident memory is the interpreter with its libraries, plus what the graph holds between steps
(model-level ops return their changed tensors as constants), plus the largest working set of one step:

- tensor-wise steps (magnitude pruning, cast, tie, weight-only ShiftAdd, ...) and the writer stream a few
  tensors at a time: a small multiple of the largest tensor in fp32; a merge holds every model's copy of the
  tensor (TIES/DARE: also its task vector, trim mask and selection buffers; ``MERGE_FACTOR`` per model);
- eval, Wanda/SparseGPT/depth pruning and calibrated ShiftAdd run on the engine: one block, the output embedding
  (ShiftAdd: the block's Hessians instead) and the samples' hidden states, whatever the depth;
- knowledge edits (ROME, EMMET, MEMIT, AlphaEdit) run statistics, keys, the multi-layer spread, sampled prefixes
  and metrics on the engine; v* keeps the blocks from the (last) edited layer on resident; they may sample
  text (``model:N``) from the run's input model on the engine with a KV cache (its blocks stay loaded when they
  fit, else one block per step);
- distillation (``retrain.distill``) runs the teacher on the engine (one block, the head, the used windows' hidden
  states), then trains the whole fp32 student with AdamW state, the kept teacher outputs (last hidden states, or
  the top-k table) and one batch's logits of both;
- concept erasure (``erase.uce``/``erase.rece``) encodes its prompts with the text encoder(s) block by block and
  reads the UNet's cross-attention k/v matrices in stacked 8192-row chunks (RECE keeps them when small); the rest
  of the pipeline (UNet, VAE) is never loaded;
- PERP materialises the model in fp32, plus bool masks, adapters and their optimizer state, the merged weights,
  the block inputs (activation checkpointing) or every block's activations, and the logits with their gradient.

The constants below were fitted to peak RSS measured on SmolLM2-135M (2-core CPU VM; ``tests/test_memory.py``
checks the demo's steps within 1.5x); they are estimates, not bounds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from surgeon.graph import Graph
    from surgeon.registry import OpSpec

GB = 1 << 30
MB = 1 << 20
BASE_TORCH = 200 * MB  # python + torch + safetensors (tensor-wise runs; measured: 0.43 GiB pruning SmolLM2)
BASE_TRANSFORMERS = 520 * MB  # + transformers and a model class (model-level runs)
BASE_HOST = 60 * MB  # python + numpy + the CLI: runs of torch-free ops (cast, drop, rename, merge linear/ties)
STREAM_FACTOR = 2  # tensors alive at once while streaming (the input and its fp32 result)
# per input model of a merge: its tensor in fp32, and for TIES/DARE its task vector, trim mask and selection
# buffers (fitted on SmolLM2: TIES of 3 copies peak RSS 1.38 GiB, linear of 2 copies 0.56 GiB)
MERGE_FACTOR = {"merge.ties": 3, "merge.dare": 3}


def _shape(graph: Graph) -> dict[str, int]:
    """The sizes that working sets depend on, from the root config (0 where the config does not say)."""
    cfg = graph.config
    text = cfg.get("text_config") or {}

    def get(*keys: str) -> int:
        for src in (cfg, text):
            for k in keys:
                if isinstance(src.get(k), int):
                    return int(src[k])
        return 0

    hidden = get("hidden_size", "n_embd", "d_model")
    return {"hidden": hidden, "layers": get("num_hidden_layers", "n_layer", "num_layers"),
            "vocab": get("vocab_size"), "ffn": get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
            "heads": get("num_attention_heads", "n_head") or 1, "kv_heads": get("num_key_value_heads")}


def _numel(graph: Graph) -> int:
    import math

    return sum(math.prod(graph[n].shape) for n in graph.names())


def _largest_fp32(graph: Graph) -> int:
    import math

    return 4 * max((math.prod(graph[n].shape) for n in graph.names()), default=0)


def _sampled(spec: Any) -> bool:
    from surgeon.data import parse_model_spec

    return isinstance(spec, str) and parse_model_spec(spec) is not None


def _sampling_kv(s: dict[str, int], rows: int, length: int) -> int:
    """KV cache of batched self-sampling (fp32)."""
    kv_dim = s["hidden"] * (s["kv_heads"] or s["heads"]) // max(s["heads"], 1)
    return 2 * s["layers"] * min(rows, 32) * length * kv_dim * 4


def _decode_work(s: dict[str, int], model: int, rows: int, length: int) -> int:
    """Generation on the engine (``surgeon/engine/generate.py``: ``model:N`` sampling, ``eval --generate``): the
    blocks and the head stay loaded in fp32 when they fit 6 GiB (as much as a whole module), else one block per
    step, then the head read in its stored dtype (fp32 bytes here: an upper bound; measured on the 8B shape:
    3.14 GB peak RSS in all); plus the KV cache."""
    head = 4 * s["vocab"] * s["hidden"]
    held = model if model <= 6 * GB else max(model - 2 * head, model // 2) // max(s["layers"], 1) + head
    return held + _sampling_kv(s, rows, length)


def _perp(graph: Graph, params: Any, s: dict[str, int], model: int) -> int:
    from surgeon.data import effective_seqlen

    seqlen = effective_seqlen(params.seqlen, graph.config)
    tokens = params.batch_size * seqlen
    h, f = s["hidden"], s["ffn"]
    block = tokens * (12 * h + 6 * f) * 4 + 3 * params.batch_size * s["heads"] * seqlen * seqlen * 4
    inputs = s["layers"] * tokens * h * 4
    acts = inputs + block if getattr(params, "checkpointing", True) else s["layers"] * block
    logits = 4 * tokens * s["vocab"] * 4  # logits, their fp32 copy for the loss, log-softmax, gradient
    # fitted: the masks and zero patterns (bool), adapters with AdamW state, the merged fp32 weights and their
    # constants at the end, and what the allocator keeps of the per-linear full-size weight gradients: ~2x the
    # fp32 model on SmolLM2 (peak RSS 2.99 GB at 4 x 128 tokens and 3.33 GB at 4 x 256, 2 and 4 steps)
    work = 2 * model + acts + logits
    if params.mode == "reconstruct":
        work = 2 * model // max(s["layers"], 1) + block * 2  # one block's dense targets and activations
    if _sampled(params.data):
        work = max(work, _sampling_kv(s, 32, seqlen))
    return work


def _host_copies(params: BaseModel, n_inputs: int) -> int | None:
    """What a merge's Params say it holds besides its inputs when it runs without torch (None: it runs on torch)."""
    ask = getattr(params, "host_working_copies", None)
    return ask(n_inputs) if callable(ask) else None


def step_estimate(graph: Graph, spec: OpSpec, params: BaseModel, n_models: int = 1, *,
                  host_inputs: bool = True) -> dict[str, int]:
    """``{"work": bytes one step needs besides the base, "held": bytes it leaves in the graph}``."""
    largest = _largest_fp32(graph)
    if _calibrated_shiftadd(spec, params):
        return {"work": _shiftadd_work(graph, params, _shape(graph), 4 * _numel(graph)), "held": 0}
    if spec.multi_model:
        host = _host_copies(params, n_models) if host_inputs else None
        if host is not None:  # host kernels: the inputs are maps of the files, plus the op's own buffers
            return {"work": (host + n_models) * largest, "held": 0}
        return {"work": (STREAM_FACTOR + MERGE_FACTOR.get(spec.name, 1) * n_models) * largest, "held": 0}
    if not spec.model_level:
        return {"work": STREAM_FACTOR * largest, "held": 0}
    s = _shape(graph)
    model = 4 * _numel(graph)
    name = spec.name
    p: Any = params
    if name in EDIT_OPS:
        work = _edit_work(p, s, model, multi=name in ("edit.memit", "edit.alphaedit"),
                          per_site=2 if name == "edit.alphaedit" else 1)
        if p.cov and _sampled(p.stats_data):  # samples come from a second copy (the run's input model), before v*
            tokens = p.stats_token_count(s["ffn"])  # the op's Params know their default token count
            work = max(work, _decode_work(s, model, -(-tokens // p.stats_seqlen), p.stats_seqlen))
        return {"work": work, "held": 0}
    if name == "retrain.perp":
        return {"work": model + _perp(graph, p, s, model), "held": 3 * model // 4}
    if name == "eval":
        prompts = len(getattr(p, "generate", None) or [])  # greedy samples decode on the engine (KV cache)
        decode = _decode_work(s, model, prompts, p.max_new_tokens + 64) if prompts else 0
        return {"work": max(decode, _engine_work(graph, p, s, model)), "held": 0}
    if name in ENGINE_OPS:  # block by block; changed tensors spill to disk
        return {"work": _engine_work(graph, p, s, model, hessians=name == "prune.sparsegpt"), "held": 0}
    if name == "retrain.distill":
        return {"work": _distill_work(graph, p, s, model), "held": 0}
    if name in ERASE_OPS:
        return _erase_estimate(graph, p, rece=name == "erase.rece")
    # any other model-level op: the model in fp32 plus a calibration batch's activations
    return {"work": 2 * model, "held": model // 2}


#: model-level ops that run on the block-by-block engine (surgeon/engine): memory independent of depth
ENGINE_OPS = ("prune.wanda", "prune.sparsegpt", "prune.layers")
#: knowledge edits: statistics, keys, the spread and the metrics on the engine; v* keeps blocks resident
EDIT_OPS = ("edit.rome", "edit.emmet", "edit.memit", "edit.alphaedit")
#: concept erasure in a diffusion UNet's cross-attention (text encoders on the engine, k/v matrices streamed)
ERASE_OPS = ("erase.uce", "erase.rece")
#: last edited layer as a share of the depth when the params do not say: ROME/EMMET 5/32, MEMIT's range ends 8/32
EDIT_TOP = {False: 5 / 32, True: 8 / 32}


def _edit_work(p: Any, s: dict[str, int], model: int, *, multi: bool, per_site: int) -> int:
    """v*'s resident blocks (from the last edited layer l on, and the head: fp32 up to 6 GiB, else bf16), plus C,
    its Cholesky factor and a solve (fp64 d_ff²), plus per further edited layer ``per_site`` held d_ff² fp64
    matrices (MEMIT: its factor; AlphaEdit: P and K_pK_pᵀ). Metrics, prefixes and the spread run one block at a
    time, less than the value loop."""
    layers = max(s["layers"], 1)
    chosen = getattr(p, "layers", None) if multi else getattr(p, "layer", None)
    top = (max(chosen) if multi else chosen) if chosen else round(layers * EDIT_TOP[multi])
    resident = model * max(layers - top, 1) // layers
    resident = resident if resident <= 6 * GB else resident // 2
    n_sites = len(chosen) if multi and chosen else (round(layers * 4 / 32) if multi else 0) + 1
    # the value loop keeps every row's activations of the resident blocks for one backward pass (fp32; fitted on
    # SmolLM2, 8 MEMIT requests: ~5·hidden + 2·d_ff floats per token and block, rows of ~24 tokens)
    rows = _edit_requests(p) * (1 + (p.n_prefixes if p.n_prefixes is not None else 5) + 1)
    acts = rows * 24 * (layers - top) * (5 * s["hidden"] + 2 * s["ffn"]) * 4
    return resident + acts + 3 * 8 * s["ffn"] ** 2 + per_site * (n_sites - 1) * 8 * s["ffn"] ** 2


def _edit_requests(p: Any) -> int:
    """Requests in one value-loop batch: the batch size, or fewer when the requests (a list or a file of lines)
    are fewer; ROME runs one at a time."""
    per = getattr(p, "batch_size", None) or 1
    req = p.requests
    n = len(req) if isinstance(req, list) else None
    if isinstance(req, str):
        try:
            from pathlib import Path

            n = sum(1 for line in Path(req).expanduser().read_text().splitlines() if line.strip())
        except (OSError, UnicodeDecodeError):
            n = None
    return max(1, min(per, n) if n is not None else per)


def _engine_work(graph: Graph, p: Any, s: dict[str, int], model: int, *, hessians: bool = False) -> int:
    """One block in fp32, the output embedding and one 8192-row chunk of it, the samples' hidden states (in and
    out), and one micro-batch's attention scores (docs/engine.md, "Memory model")."""
    from surgeon.data import effective_seqlen

    h, vocab, layers = s["hidden"], s["vocab"], max(s["layers"], 1)
    seqlen = effective_seqlen(getattr(p, "seqlen", 512), graph.config)
    windows = getattr(p, "max_windows", None) or getattr(p, "n_windows", None) or 64
    head = 4 * vocab * h
    block = max(model - 2 * head, model // 2) // layers
    hidden_states = 2 * windows * seqlen * h * 4
    scores = 8 * s["heads"] * seqlen * seqlen * 4
    xtx = 2 * 8 * s["ffn"] ** 2 if hessians else 0  # the largest Hessian and its inverse (fp64)
    return block + head + 8192 * h * 4 + hidden_states + scores + xtx


def _block_fp32(s: dict[str, int]) -> int:
    """One decoder block in fp32 from the config: q, o (h²), k, v (h·kv width), three MLP matrices (h·ffn)."""
    h = s["hidden"]
    kv = h * (s["kv_heads"] or s["heads"]) // max(s["heads"], 1)
    return 4 * (2 * h * h + 2 * h * kv + 3 * h * s["ffn"])


def _distill_work(graph: Graph, p: Any, s: dict[str, int], model: int) -> int:
    """``retrain.distill``: the larger of the teacher's engine pass (one fp32 block, the output embedding, the
    used windows' hidden states in and out) and training, which holds the fp32 student twice (``model``: the
    graph's own size, an over-estimate when a tie step of the same run makes the student; twice: the unrolled
    module is built before its layers share their weights, and the allocator keeps gradient buffers, as PERP),
    the AdamW moments and gradient of its non-embedding weights, the block inputs (activation checkpointing) or
    every block's activations, copies of one batch's ``[b, L, V]`` logits (6 for the student's log-softmax and its
    backward; 6 more with exact KL: the teacher's logits, their tempered log-softmax and softmax, the KL terms),
    and the kept teacher outputs (exact KL: the last hidden states; top-k: values and ids). Sampled data
    (``model:N``) first builds the fp32 teacher with a KV cache. Fitted on SmolLM2 (docs/retrain.md)."""
    from surgeon.data import effective_seqlen

    h, vocab, layers = s["hidden"], s["vocab"], max(s["layers"], 1)
    seqlen = effective_seqlen(p.seqlen, graph.config)
    used = min(p.max_windows, p.steps * p.batch_size)
    hidden = used * seqlen * h * 4
    head = 4 * vocab * h
    teacher = _block_fp32(s) + head + 8192 * h * 4 + 2 * (hidden + p.eval_windows * seqlen * h * 4)
    kept = used * seqlen * p.top_k * 12 if p.top_k else hidden
    tied = bool(graph.config.get("tie_word_embeddings"))
    trained = max(model - (1 if tied else 2) * head, model // 2)
    tokens = p.batch_size * seqlen
    block_acts = tokens * (12 * h + 6 * s["ffn"]) * 4 + 3 * p.batch_size * s["heads"] * seqlen * seqlen * 4
    acts = layers * tokens * h * 4 + block_acts if p.checkpointing else layers * block_acts
    copies = 6 if p.top_k else 12
    train = 2 * model + 3 * trained + acts + copies * tokens * vocab * 4 + kept
    work = max(teacher, train)
    if _sampled(p.data):
        work = max(work, _decode_work(s, model, 32, seqlen))
    return work


def _erase_estimate(graph: Graph, p: Any, *, rece: bool) -> dict[str, int]:
    """``erase.uce``/``erase.rece``: per text encoder, its embeddings and one block in fp32 and the prompts' hidden
    states of its largest call in and out (77 positions; ``largest_encoding()`` of the op's Params: the artist
    preset's other artists, or the erased prompts; spilled past 1 GiB each); the k/v matrices in stacked 8192-row fp32 chunks
    (RECE keeps them all for the apply pass when they fit 512 MiB); held: the edited k/v matrices when the edit
    is dense (many erased rows) and kept as constants until written. Checked on the SD1.4-shaped synthetic
    pipeline of benchmarks/erase.py (fp16, CLIP-L text encoder, the UNet's attention tensors only), RECE
    ``--preset nudity``: 0.83 GiB estimated for the run vs 0.94 GiB peak RSS (the old 2 x model rule: 1.75 GiB,
    and 7.8 GiB with the real UNet's other 0.8 B parameters, which erasure never loads)."""
    import math
    import re

    from surgeon.arch.diffusion import XATTN_K

    kv = [n for n in graph.names() if n.endswith((XATTN_K, XATTN_K.replace("to_k", "to_v")))]
    kv_fp32 = sum(4 * math.prod(graph[n].shape) for n in kv)
    widest = max((graph[n].shape[1] for n in kv), default=0)
    chunk = min(kv_fp32, 2 * 4 * 8192 * widest)  # a stacked block and its product
    kept = kv_fp32 if rece and kv_fp32 <= 512 * MB else 0
    blocks: dict[str, int] = {}
    embeddings = 0
    width = 0
    for n in graph.names():
        m = re.search(r"(.*encoder\.layers\.\d+\.)", n)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + 4 * math.prod(graph[n].shape)
        elif n.endswith(("token_embedding.weight", "position_embedding.weight")):
            embeddings += 4 * math.prod(graph[n].shape)
            width += graph[n].shape[-1] if "token" in n else 0
    hidden = min(2 * p.largest_encoding() * 77 * width * 4, 2 * GB)  # the op's Params resolve their preset
    work = embeddings + max(blocks.values(), default=0) + hidden + max(chunk, kept)
    held = sum(math.prod(graph[n].shape) * graph[n].dtype.itemsize for n in kv)
    return {"work": work, "held": held}


def _calibrated_shiftadd(spec: OpSpec, params: BaseModel) -> bool:
    """ShiftAdd's activation-aware fit runs the model (the engine); its weight-only fit streams tensors."""
    return spec.name == "shiftadd" and not getattr(params, "weight_only", True)


def _shiftadd_work(graph: Graph, p: Any, s: dict[str, int], model: int) -> int:
    """Calibrated ShiftAdd on the engine: one fp32 block, the samples' hidden states and attention scores
    (``_engine_work`` without the head, which it never runs), plus the larger of (a) one block's Hessians in fp32
    while they are observed (a Llama block: q, k, v, o, gate, up read width-h inputs, down a width-ffn one) and
    (b) the widest Hessian with its in-place-factored working copy (fp64 up to 8192 wide), the fitted linear's
    fp32 copies and its uint8 codes. Sampled calibration text (``model:N``) is generated first (``_decode_work``)."""
    h, f = s["hidden"], s["ffn"]
    engine = _engine_work(graph, p, s, model) - 4 * s["vocab"] * h - 8192 * h * 4
    observed = 4 * (6 * h * h + f * f)
    wide = max(h, f)
    fit = 4 * wide * wide + (8 if wide <= 8192 else 4) * wide * wide + 3 * 4 * h * f + h * f
    work = engine + max(observed, fit)
    if _sampled(getattr(p, "data", None)):
        from surgeon.data import effective_seqlen

        work = max(work, _decode_work(s, model, p.max_windows, effective_seqlen(p.seqlen, graph.config)))
    return work


def run_estimate(graph: Graph, validated: list[tuple[OpSpec, BaseModel]], n_models: int = 1, *,
                 host_inputs: bool = True) -> dict[str, Any]:
    """Peak of the whole run and of each step (see the module docstring); ``n_models``: inputs of a merge;
    ``host_inputs``: every input tensor can be read without torch (not so for LoRA adapters or pickles, which
    send even a torch-free op down the torch path)."""
    model_level = any(spec.model_level or _calibrated_shiftadd(spec, p) for spec, p in validated)
    host = host_inputs and all(spec.torch_free and (not spec.multi_model or _host_copies(p, n_models) is not None)
                               for spec, p in validated)
    base = BASE_TRANSFORMERS if model_level else BASE_HOST if host else BASE_TORCH
    held = 0
    steps = []
    for spec, params in validated:
        est = step_estimate(graph, spec, params, n_models, host_inputs=host_inputs)
        steps.append(base + held + est["work"])
        held += est["held"]
    write = base + held + STREAM_FACTOR * _largest_fp32(graph)
    return {"peak_bytes": max([write, *steps]), "step_peak_bytes": steps, "write_peak_bytes": write}
