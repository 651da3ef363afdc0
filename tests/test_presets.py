"""Real-model presets, exercised on tiny random models of the same architecture built here."""

import json

import pytest

from cl.core.data import PromptFormat
from cl.model import load_model_and_tokenizer
from tests.conftest import compose_cfg, run_cli

@pytest.mark.parametrize("preset, hub_id", [("qwen2_5_0_5b_instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
                                            ("qwen2_5_1_5b_instruct", "Qwen/Qwen2.5-1.5B-Instruct")])
def test_presets_name_the_hub_checkpoint_with_chat_template_and_no_remote_code(preset, hub_id):
    cfg = compose_cfg(f"model={preset}", "base=none")
    assert cfg.model.name_or_path == hub_id
    assert cfg.model.use_chat_template is True and cfg.model.trust_remote_code is False


def test_chat_template_wraps_prompts(tiny_qwen):
    model, tok = load_model_and_tokenizer(tiny_qwen)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    fmt = PromptFormat(tok, use_chat_template=True)
    text = fmt.prompt_texts(["A3:123+456="])[0]
    assert text == "<|im_start|>user\nA3:123+456=<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.prompt_ids(["x"])[0][0] != tok.bos_token_id  # the template, not a bare bos, starts it


def test_preset_runs_a_stream_from_a_local_directory(tiny_qwen, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("model=qwen2_5_0_5b_instruct", f"model.name_or_path={tiny_qwen}", "base=none", "logger=none",
                   "stream.tasks=[sub2,mul21]", "stream.general=[copy6]", "stream.steps_per_task=3",
                   "stream.batch_size=4", "eval.n_per_task=8", "data.n_train=50", "data.n_eval=20",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["base_model"]["path"] == str(tiny_qwen)
    assert len(res["acc_matrix"]) == 2


def test_missing_local_checkpoint_is_one_clear_line(tmp_path):
    proc = run_cli("model=qwen2_5_0_5b_instruct", f"model.name_or_path={tmp_path / 'missing'}", "base=none",
                   "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.name_or_path: local directory '{tmp_path / 'missing'}' does not exist"]
