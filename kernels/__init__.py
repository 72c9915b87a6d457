"""Triton kernels and their launchers (installed as ``seqrec_fast.kernels``).

Importing a kernel module needs triton; the ops import them lazily so that
``import seqrec_fast`` works without it.
"""
