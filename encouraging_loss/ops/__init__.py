"""The Encouraging Loss's fast implementations, each tested against
:func:`encouraging_loss.reference.reference_rows`:

* :mod:`~encouraging_loss.ops.fused`: loss and closed-form gradient in one
  pass, no N x V temporaries (an autograd Function; compiled on CPU, the Triton
  kernels on CUDA);
* :mod:`~encouraging_loss.ops.triton_kernels`: the Triton forward / backward
  kernels and their launch configuration;
* :mod:`~encouraging_loss.ops.fused_linear`: output projection and loss
  chunk by chunk, the logits never stored in full.

They import the loss's lower layers only (:mod:`encouraging_loss.bonus`,
:mod:`encouraging_loss.checks`, :mod:`encouraging_loss.reference`).
"""
