"""The lower layer: what the engine (``cl.run``, ``cl.loop``, ``cl.module``, ``cl.trainer``, ``cl.objectives``)
and the method packages (``tasks/``, ``replay/``, ``analysis/``) share. Nothing here imports the engine.

- :mod:`cl.core.data`: prompts and answers to token ids, padded batches;
- :mod:`cl.core.losses`: the answer cross-entropy;
- :mod:`cl.core.steps`: callbacks that act every n optimizer steps;
- :mod:`cl.core.components`: the stream component protocol (the hooks the task loop calls).
"""
