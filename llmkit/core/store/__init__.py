"""Layer 8, store: what a run leaves on disk.

- ``checkpoint.py``: atomic safetensors checkpoints, reading and loading them;
- ``rundir.py``: the run directory: checkpointer, pruning, resume source;
- ``lock.py``: one writer per run directory;
- ``metrics_log.py``: ``metrics.jsonl``, written event by event and read back.

Rule: imports only the layers below; nothing is unpickled; a directory without
``trainer_state.json`` is never loaded.
"""
