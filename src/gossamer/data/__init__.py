"""Datasets: the embedded corpus, text files, token files, and per-peer streams. Torch only."""

from gossamer.data.corpus import Corpus, TokenSource, load_corpus, stdlib_source_files
from gossamer.data.streams import TokenStream, validation_batches
from gossamer.data.tokenizer import VOCAB_SIZE, decode, encode, encode_bytes

__all__ = [
    "VOCAB_SIZE",
    "Corpus",
    "TokenSource",
    "TokenStream",
    "decode",
    "encode",
    "encode_bytes",
    "load_corpus",
    "stdlib_source_files",
    "validation_batches",
]
