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
sys.path.insert(0, str(ROOT / "scripts"))
from resume_check import env as run_env  # noqa: E402  (one definition of a run's environment)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One base-checkpoint cache for the whole test session (the smoke base is trained once)."""
    d = Path(os.environ.get("CL_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cl-cache"))
    os.environ["CL_CACHE_DIR"] = str(d)
    return d


def compose_cfg(*overrides: str):
    """Compose the real config tree with overrides (no run directory, no Hydra job)."""
    return compose_config(*overrides)


def base_model(cfg, run_dir: Path) -> dict:
    """Build (or find in ``cfg.cache_dir``) the base model of ``cfg`` as a run would; its ``base_info``."""
    from cl.run import prepare_model
    from tasks.stream import build_tasks

    names = list(cfg.base.general) + list(cfg.base.exposure)
    tasks = {t.name: t for t in build_tasks(names, cfg.data.n_train, cfg.data.n_eval, cfg.data.seed)}
    return prepare_model(cfg, run_dir, tasks)[2]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m cl.run ARGS`` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "cl.run", *args], cwd=cwd or ROOT, env=run_env(),
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


from cl.tokenizer import QWEN_STYLE_TEMPLATE  # noqa: E402  (tests import it from here)


@pytest.fixture()
def tiny_qwen(tmp_path):
    """A tiny random Qwen2 (the real presets' architecture) with the char tokenizer and a chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = QWEN_STYLE_TEMPLATE
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path / "tiny-qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def tiny_qwen_bytes(tmp_path):
    """A tiny random Qwen2 with a byte-level tokenizer (every UTF-8 text encodes, as with the real Qwen
    tokenizer: TRACE's Chinese and German rows) and a Qwen-style chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cl.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path / "tiny-qwen2-bytes"
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
