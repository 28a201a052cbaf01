"""Reference-based sketch colorization (Lee et al., CVPR 2020) with fused SCFT kernels."""

__version__ = "0.1.0"
