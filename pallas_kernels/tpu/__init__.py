"""TPU Pallas kernels (`pl.pallas_call` + scalar prefetch). They also run on CPU in interpret mode."""
