"""Data pipeline: raw corpora → prepared token files → packed, resumable training batches; chat and task data.

The names below load on first use, so `llmhpc.data.arithmetic` (standard library only) imports without torch.
"""

from importlib import import_module

_WHERE = {
    "SUPPORTED_SUFFIXES": "corpus",
    "file_documents": "corpus",
    "iter_documents": "corpus",
    "source_files": "corpus",
    "corpus_fingerprint": "prepare",
    "prepare_corpus": "prepare",
    "read_meta": "prepare",
    "PackedTokens": "pretrain",
    "PretrainLoader": "pretrain",
    "eval_batches": "pretrain",
    "make_batch": "pretrain",
    "document_separator_id": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"llmhpc.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'llmhpc.data' has no attribute {name!r}")
