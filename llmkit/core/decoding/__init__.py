"""Layer 5, decoding: from logits to text.

- ``sampling.py``: pure functions on logits (temperature, top-k/p, min-p, penalties, n-gram bans);
- ``steps.py``: the mechanics (prefill, choose, step; beam search; text streams, stop strings);
- ``speculative.py``: exact speculative greedy decoding (prompt lookup, a draft model);
- ``structure.py``: structured outputs (choices, regular expressions, JSON schemas) through a
  grammar engine; ``tools.py``: tool calls built on them;
- ``decoder.py``: the policy (``Decoder``: prompt templates, beam or batch, the seeding rule).

Rule: imports only the layers below; a row's output never depends on its batch; front ends
render, they do not decide.
"""
