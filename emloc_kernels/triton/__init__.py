"""Triton kernels, one module per kernel family; each module holds its kernels and their launchers."""
