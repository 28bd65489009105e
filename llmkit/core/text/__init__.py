"""Layer 3, text: text becomes tokens and examples.

- ``tokenizer.py``: SentencePiece training (on a seeded sample) and the tokenizer contract;
- ``templates.py``: chat templates, rendered in jinja2's sandbox;
- ``token_cache.py``: the sharded, resumable, content-keyed token cache built by worker processes;
- ``mix.py``: sources mixed by weight, and where validation comes from;
- ``batches.py``: language-modelling batches drawn from the token streams;
- ``examples.py``: task files (classification, instructions, pairs) to tokenized examples.

Rule: imports only the layers below (host, files) and core's top level; no torch model here.
decode(encode(x)) == x, and a cache is never trusted when damaged.
"""
