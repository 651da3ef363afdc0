"""The suite's Hydra launcher plugins (``hydra/launcher=cl_parallel``)."""
