"""Relaxed Recursive Transformers (arXiv 2410.20672): plan (slot map), relax (SVD of residuals), op (wiring)."""
