"""Toy comparison on the fact model of tests/test_edit.py: EMMET residual paper vs delta, and MEMIT, 16 edits at
once (subject i -> object of i + 1), the 8 untouched facts as neighbourhood prompts.

    PYTHONPATH=. python benchmarks/edit_toy.py   (from the repository root; trains the toy model, about a minute)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, "tests")
    import test_edit as toy

    from surgeon.api import run_op

    root = Path(tempfile.mkdtemp(prefix="surgeon-edit-toy-"))
    os.environ["SURGEON_CACHE"] = str(root / "cache")
    model = toy._train_fact_model(root / "model")
    stats = toy._stats_text(root / "stats.txt")
    neighbours = [toy.TEMPLATES[0].format(s) for s in toy.SUBJECTS[16:]]
    reqs = [toy._request(i, (i + 1) % 16, neighborhood=neighbours, paraphrases=[toy.TEMPLATES[1]])
            for i in range(16)]
    runs = [("emmet_paper", "edit.emmet", {"residual": "paper"}),
            ("emmet_delta", "edit.emmet", {"residual": "delta"}),
            ("memit_0_1", "edit.memit", {"layers": [0, 1], "lam": 100.0})]
    for name, op, kw in runs:
        res = run_op(op, str(model), output=str(root / name), device="cpu", requests=reqs, stats_data=stats,
                     n_prefixes=2, **kw)
        m = res["results"][-1]
        got = toy._answers(root / name, [toy.TEMPLATES[0].format(s) for s in toy.SUBJECTS])
        row = {k: m.get(k) for k in ("efficacy", "efficacy_greedy", "paraphrase", "paraphrase_greedy",
                                     "neighborhood", "neighborhood_unchanged", "target_prob")}
        row["edited_greedy"] = sum(g == toy.OBJECTS[(i + 1) % 16] for i, g in enumerate(got[:16]))
        row["untouched_kept"] = sum(a == b for a, b in zip(got[16:], toy.OBJECTS[16:]))
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
