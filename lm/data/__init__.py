"""Corpora, vocabularies, the token cache, ordered training streams and the LightningDataModule."""

from lm.data.cache import TokenCache
from lm.data.corpora import CorpusFiles, find_corpus, resolve_roots
from lm.data.streams import OrderedStreams
from lm.data.tokenizer import Vocab

__all__ = ["CorpusFiles", "OrderedStreams", "TokenCache", "Vocab", "find_corpus", "resolve_roots"]
