"""Layer 7, tasks: what a run learns and how it is measured.

- ``objectives.py``: ``LMTask``, ``ClassifyTask``, ``PairTask``: batches, loss and validation
  metrics for the loop, and the measurements ``eval`` shares;
- ``metrics.py``: accuracy, macro-F1, chrF, BLEU, bits per byte (pure Python).

Rule: imports only the layers below; batches are pure functions of (seed, step, micro-batch), so
resume is exact.
"""
