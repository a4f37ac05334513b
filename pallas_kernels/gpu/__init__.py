"""Mosaic GPU (Hopper) kernels. Import submodules explicitly (`from pallas_kernels.gpu import flash`)."""
