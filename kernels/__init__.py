"""Triton attention kernels (installed as dalle_ar.kernels)."""
