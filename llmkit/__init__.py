"""llmkit: from raw text to a working small language model.

Only the version lives here: importing ``llmkit`` must never import torch, so that
``llmkit --help`` stays instant.
"""

__version__ = "0.1.0"
