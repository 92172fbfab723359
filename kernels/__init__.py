"""Triton kernels, shipped inside the wheel as `ensel.kernels` (imports inside stay relative).

fused.py (the [E, N, K] reduction), streaming.py (accumulator check / update / finalize),
_rowmath.py (the per-row math they share, twin of csrc/include/ensel/row.h) and launch.py (host
side: strategy by K, configurations, autotuning). Nothing is imported here: `triton.jit` decides
between compiling and interpreting (TRITON_INTERPRET) when a kernel module is imported, so
ensel.backends.triton imports them only when a kernel is first launched.
"""
