"""Tenstorrent mesh topologies, their Ethernet link model, collective (CCL) plans with an alpha-beta cost,
and tensor-parallel sharding plans for Llama models. Pure Python: no device, no engine.

Installed as ``ttedge.ethernet_mesh`` (the repository keeps it at top level, like ``model_zoo``).
"""
