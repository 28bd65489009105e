"""The corpus path, from files on disk to token ids a training step reads.

- ``files``: finding files and knowing each one's format (text, JSON lines, parquet; gzip, zstd);
  small files read whole;
- ``stream``: reading big files in bounded memory, the content hash on the way, pieces of work,
  and the seeded line sample a tokenizer trains on;
- ``cache``: the sharded, resumable, content-keyed token cache, built by worker processes;
- ``mix``: sources mixed by weight and where validation comes from.
"""

from llmkit.core.corpus.files import (CorpusFile, decode_text, read_bytes, read_corpus, read_text, resolve_corpus,
                                      resolve_files, sample_corpus)

__all__ = ["CorpusFile", "decode_text", "read_bytes", "read_corpus", "read_text", "resolve_corpus", "resolve_files",
           "sample_corpus"]
