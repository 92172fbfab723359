"""Triton kernels, shipped inside the wheel as `ensel.kernels` (imports inside stay relative).

The fused and streaming Triton kernels arrive with the GPU issue; the package exists now so the
wheel's layout (ensel/kernels/, no top-level `kernels`) is fixed and tested from the start.
"""
