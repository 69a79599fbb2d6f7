"""Shared kernels below both `models/` and `parallel/`: fused RMSNorm (+ residual add), rotary and
SiLU-and-mul, as Triton kernels (`fused_triton`) behind a torch reference path (`fused`).

Imports only torch and triton (and `cluster.platform` if it must), so a model layer and a
tensor-parallel layer can both use the same kernel without one package importing the other.
"""
