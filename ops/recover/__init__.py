"""CheckFree / CheckFree+ (arXiv 2506.15461): stages (partition, sources, Eq. 1), op (layout, detection, wiring)."""
