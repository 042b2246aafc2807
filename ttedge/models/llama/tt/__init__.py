"""The TT-NN port of the Llama family (decode and prefill, on one chip or split over a 1xN mesh), after
tt-metal's ``models/tt_transformers``: one module per file, weights prepared on the host from canonical
numpy arrays.

This package imports ``ttnn`` (``rope_tables.py`` excepted, plain numpy the CPU tier checks the rotary
kernel with); nothing outside it does, so the CPU package imports without it.
"""
