"""Layer 9, interop: pretrained models in, llmkit models out (Hugging Face folders, GGUF files).

- ``resolve.py``: any path a user names (a checkpoint, a run directory, a Hugging Face folder, a
  ``.gguf``) to an llmkit checkpoint: pretrained models are imported once into the cache, keyed by
  the source's content; ``open_checkpoint``/``open_model``/``open_tokenizer`` are what commands call;
- ``hf.py``: a Hugging Face model folder (``config.json``, safetensors, possibly sharded) to and
  from llmkit's network and weight names;
- ``gguf_io.py``: GGUF files (llama.cpp's format) through the ``gguf`` package: metadata, tensors
  dequantised, llama.cpp's q/k row permutation undone; and writing them back;
- ``tokenizer_io.py``: the tokenizer of a pretrained model (``tokenizer.json``, ``tokenizer.model``,
  or the vocabulary and merges inside a GGUF) as an llmkit tokenizer contract, and llmkit's own
  tokenizers written back in the formats those tools read;
- ``packages.py``: pretrained models that registry packages install, found by a short name;
- ``folder.py``: the files of a model folder made by a stranger, never a path or link outside it;
- ``export.py``: an llmkit checkpoint as a Hugging Face folder or a GGUF file, with a model card.

Rule: imports only the layers below (the store writes and reads the checkpoints an import makes);
a table of names, never a second network; imports write ordinary checkpoints; unsupported options
are refused by name. Nothing here downloads anything: models come from local folders and files.
"""
