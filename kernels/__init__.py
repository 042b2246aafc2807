"""Custom TT-Lang kernels (installed as ``ttedge.kernels``), each with a torch golden in ``golden.py``:

- ``residual_rmsnorm``: the residual add and the RMSNorm after it, fused;
- ``swiglu``: ``silu(gate) * up``;
- ``rotary``: rotary position embedding with a rotation matrix input (Hugging Face's rotate-half, or the
  TT port's Meta pair order);
- ``speculative_acceptance``: the accepted length of each sequence's draft, for greedy verification.

Importing this package imports neither TT-Lang nor its simulator: a kernel module needs one of them
(``dsl.py``), ``golden.py`` only torch, ``simulation.py`` runs kernels in the simulator in a worker process.
"""
