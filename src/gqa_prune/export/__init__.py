"""Export pruned checkpoints for other runtimes: GGUF for llama.cpp."""

from gqa_prune.export.gguf_export import OUTTYPES, export_gguf

__all__ = ["OUTTYPES", "export_gguf"]
