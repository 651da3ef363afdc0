"""Shared fixtures: the composed config tree, a session-wide base cache, tiny models built inline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cl.run import compose_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One base-checkpoint cache for the whole test session (the smoke base is trained once)."""
    d = Path(os.environ.get("CL_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cl-cache"))
    os.environ["CL_CACHE_DIR"] = str(d)
    return d


def compose_cfg(*overrides: str):
    """Compose the real config tree with overrides (no run directory, no Hydra job)."""
    return compose_config(*overrides)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m cl.run ARGS`` in a subprocess, as a user would."""
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "cl.run", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def tiny_model_dir(tmp_path) -> Path:
    """A random tiny Llama + char tokenizer written with save_pretrained."""
    from cl.model import build_tiny_llama

    return build_tiny_llama(tmp_path / "tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
