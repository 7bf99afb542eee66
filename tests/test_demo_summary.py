"""The demo prints the chain's edit efficacy (issue #22 item 5): after the edit step and after pruning + PERP."""
from __future__ import annotations

import io

from rich.console import Console

from surgeon.demo import _print_table, chain_summary

CHAIN = {"variant": "EMMET ×4 → prune 50% → PERP", "disk_mb": 542.0, "params_m": 135.4, "perplexity": 61.25,
         "fact_recall": 0.5, "edit_efficacy": 0.75, "seconds": 300.0,
         "edit_step": {"efficacy": 1.0, "efficacy_greedy": 1.0, "paraphrase": 0.75, "neighborhood": 1.0},
         "edit_protection": {"prune": "refit", "perp_edit_loss": True}}
BASE = {"variant": "SmolLM2-135M fp32", "disk_mb": 538.0, "params_m": 134.5, "perplexity": 34.45,
        "fact_recall": 1.0, "edit_efficacy": 0.0, "seconds": 0.0}


def test_chain_summary_names_both_efficacies_and_the_protection():
    assert chain_summary(CHAIN) == (
        "Edit efficacy of the chain: after the EMMET step greedy 100%, P(new) > P(old) 100%, paraphrase 75%, "
        "neighbourhood 100%; after 50% pruning + PERP greedy 75% (pruning protection: refit, PERP edit loss: on).")
    assert chain_summary(BASE) is None
    off = dict(CHAIN, edit_protection={"prune": "off", "perp_edit_loss": False}, edit_efficacy=0.0)
    assert chain_summary(off).endswith("greedy 0% (pruning protection: off, PERP edit loss: off).")


def test_printed_table_carries_the_chain_row_and_its_edit_line(capsys):
    _print_table([BASE, CHAIN], Console(file=io.StringIO(), width=200))
    err = capsys.readouterr().err
    row = next(line for line in err.splitlines() if "PERP" in line and "61.25" in line)
    assert "0.75" in row and "0.50" in row  # edit efficacy and fact recall columns of the chain row
    assert "after 50% pruning + PERP greedy 75%" in " ".join(err.split())
