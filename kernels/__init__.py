"""Numeric kernels behind one small dispatch: torch on the chosen device for dense linear algebra, numba on
CPU and Triton on CUDA for custom kernels. Kernels know tensors and devices, never models."""
