"""Layer 2, files: inputs read from disk in bounded memory.

- ``corpus.py``: finding corpus files and knowing each one's format (text, JSON lines, parquet;
  gzip, zstd); small files read whole;
- ``stream.py``: reading big files in bounded memory, the content hash on the way, pieces of
  work, and the seeded line sample a tokenizer trains on;
- ``records.py``: the items of line-oriented inputs (lines, JSON lines, CSV/TSV: one table reader).

Rule: imports only core's top-level modules; every error names the file and the line or byte
offset; no corpus file is ever read whole.
"""
