"""Layer 10, jobs: the use cases the commands call.

- ``run.py``: the run driver shared by pretraining and fine-tuning (``train_run``);
- ``pretrain.py``, ``finetune.py``, ``evaluate.py``, ``embed.py``: what is particular to each job;
- ``introspect.py``: looking inside a model (tokens, attention, surprisal, logit lens, embedding maps);
- ``report.py``, ``pictures.py``: report.html and the matplotlib drawings.

Rule: the top of core: imports any layer below, never the CLI or the server; each job prepares a
model and a task, then hands over to ``train_run`` (or decodes, encodes): no job repeats another's
machinery.
"""
