"""Replay and rehearsal-free mitigations, each a stream component wired by ``cl/run.py``.

``buffers`` (reservoir, task-balanced), ``schedules`` (past-task weights, replay fraction within a task),
``mixing`` (experience replay into each batch), ``gere`` (general-sample replay losses), ``regularizers``
(L2 to the start, online EWC, KL distillation), ``meta`` (Reptile interpolation, k-FPF).
"""
