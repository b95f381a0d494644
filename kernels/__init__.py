"""Paged-attention kernels (Triton on GPU, torch reference on CPU); filled by the real-backend issue."""
