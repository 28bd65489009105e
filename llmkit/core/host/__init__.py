"""Layer 1, host: the machine a job runs on.

- ``machine.py``: the machine's key (CPU model, flags, the kernels' instruction set, threads, torch)
  and the file of per-machine measurements that probes cache under it;
- ``device.py``: the device, the precision and the number of threads a job uses;
- ``signals.py``: Ctrl-C and SIGTERM as exceptions, deferred around the optimizer update.

Rule: imports only core's top-level modules (``errors``, ``config``, ``files``): nothing here knows
of text, models or training.
"""
