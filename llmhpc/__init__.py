"""llmhpc: train Llama-family models from pretraining to a served endpoint."""

__version__ = "0.1.0"
