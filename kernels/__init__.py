"""Triton kernels for sglang_elastic (installed as ``sglang_elastic.kernels``).

Kernels are added by the dispatcher work; every kernel has a torch reference beside it.
"""
