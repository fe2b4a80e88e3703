"""DiffusionRet text-video retrieval pipeline: the library (no CLI, no DVC knowledge)."""

__version__ = "0.1.0"
