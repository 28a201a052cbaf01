"""Triton kernels of sketchcolor, installed as the package sketchcolor.kernels.

scft_attention       SCFT cross-attention: forward, backward, configs, options, launchers
correspondence_loss  the correspondence loss's kernels
_tiles               tile arithmetic both kernel modules share (@triton.jit, inlined where called)
aot                  ahead-of-time compilation of recorded launches for any GPUTarget (no GPU needed)

Importing a kernel module imports triton; set TRITON_INTERPRET=1 before that to run the
kernels on CPU tensors. Training code reaches these only through sketchcolor.ops.
"""
