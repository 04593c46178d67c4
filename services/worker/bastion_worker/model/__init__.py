"""The model: loading it, and the forward passes, attention and CPU kernels it runs."""
