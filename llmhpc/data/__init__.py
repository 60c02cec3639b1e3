"""Data pipeline: raw corpora → prepared token files → packed, resumable training batches."""

from llmhpc.data.corpus import SUPPORTED_SUFFIXES, file_documents, iter_documents, source_files
from llmhpc.data.prepare import corpus_fingerprint, prepare_corpus, read_meta
from llmhpc.data.pretrain import PackedTokens, PretrainLoader, eval_batches, make_batch
from llmhpc.data.tokenizer import document_separator_id, load_tokenizer

__all__ = [
    "SUPPORTED_SUFFIXES",
    "PackedTokens",
    "PretrainLoader",
    "corpus_fingerprint",
    "document_separator_id",
    "eval_batches",
    "file_documents",
    "iter_documents",
    "load_tokenizer",
    "make_batch",
    "prepare_corpus",
    "read_meta",
    "source_files",
]
