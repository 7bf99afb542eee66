"""ShiftAdd (ShiftAddLLM, arXiv 2406.05981): math in scales/bcq/gptq, model passes in calibrate, the op in op."""
