"""ttedge: a Tenstorrent-native LLM inference runtime for edge servers, with a first-class CPU backend."""

__version__ = "0.1.0"
