"""Layer 6, training: the loop and how it runs fast.

- ``loop.py``: ``Trainer.fit``, the optimizer, schedule and budgets;
- ``distributed.py``: torchrun, DDP and FSDP2;
- ``speed.py``: the probe that picks precision and compilation for this machine and shape;
- ``recipe.py``: a model sized to the budget;
- ``memory.py``: what a step holds, and whether blocks recompute their activations.

Rule: imports only the layers below; the loop knows no task, no corpus and no directory layout;
one host sync per step.
"""
