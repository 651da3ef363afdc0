"""GRPO rollout backends: the vLLM path's weight sync and sampling plumbing against a stand-in engine
with vLLM's interface (this machine has no vLLM and no GPU; the real engine is exercised by
``test_real_vllm_rollouts`` and ``scripts/gpu_check.sh`` where both exist)."""

from __future__ import annotations

import math
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from cl.rollouts import HFRollouts, VLLMRollouts, vllm_available, vllm_weights
from tests.conftest import compose_cfg


class StandInLLM:
    """vLLM's ``LLM`` as the backend uses it: built from a model path, ``load_weights`` on
    ``llm_engine.model_executor.driver_worker.model_runner.model``, ``generate`` with token-id prompts
    and one ``SamplingParams`` per prompt, ``reset_prefix_cache``. Loading an unknown name raises, as
    vLLM's loader does."""

    instances: list["StandInLLM"] = []
    logprob_shift = 0.0  # added to every returned log-prob: a sampler that disagrees with the trainer

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.loaded: list[str] = []
        self.resets = 0
        self.requests = 0
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))
        StandInLLM.instances.append(self)

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM model has no parameter {name}")
            with torch.no_grad():
                params[name].copy_(tensor)
            self.loaded.append(name)

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        outs = []
        if not isinstance(sampling_params, list):  # one SamplingParams for every prompt, as vLLM allows
            sampling_params = [sampling_params] * len(prompts)
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            self.requests += 1
            ids = torch.tensor([prompt["prompt_token_ids"]])
            greedy = sp.temperature == 0.0
            sampling = {} if greedy else {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": 0}
            with torch.random.fork_rng():
                torch.manual_seed(getattr(sp, "seed", 0) or 0)
                out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                       **sampling, max_new_tokens=sp.max_tokens,
                                       num_return_sequences=sp.n, eos_token_id=sp.stop_token_ids[0],
                                       pad_token_id=sp.stop_token_ids[0], return_dict_in_generate=True,
                                       output_scores=True)
            # "processed_logprobs": log-softmax of the scores after temperature and top-p, as sampled from
            logps = torch.stack(out.scores, 1).float().log_softmax(-1)  # [n, steps, V]
            comps = []
            for r, row in enumerate(out.sequences[:, ids.size(1):].tolist()):
                stop = sp.stop_token_ids[0]
                finished = stop in row
                toks = row[: row.index(stop)] if finished else row
                lp = None
                if getattr(sp, "logprobs", None) is not None:  # the sampled token's log-prob per returned token
                    lp = [{t: SimpleNamespace(logprob=float(logps[r, i, t]) + self.logprob_shift, rank=1)}
                          for i, t in enumerate(toks)]
                comps.append(SimpleNamespace(token_ids=toks, finish_reason="stop" if finished else "length",
                                             logprobs=lp))
            outs.append(SimpleNamespace(outputs=comps))
        return outs


@pytest.fixture()
def stand_in_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = StandInLLM
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(VLLMRollouts, "check_available", staticmethod(lambda: None))
    StandInLLM.instances.clear()
    StandInLLM.logprob_shift = 0.0
    saved = dict(os.environ)  # the engine sets RANK, WORLD_SIZE, MASTER_PORT, ...: undo after the test
    yield StandInLLM
    os.environ.clear()
    os.environ.update(saved)


def _module(model, task_idx=0, global_iter=0):
    return SimpleNamespace(model=model, task_idx=task_idx, global_iter=global_iter)


def test_sync_pushes_the_trainers_weights_under_transformers_names(stand_in_vllm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained: different from the files the engine loads
    backend = VLLMRollouts()
    backend.sync(_module(model))
    engine = stand_in_vllm.instances[0]
    assert engine.kwargs["skip_tokenizer_init"] and engine.resets == 1
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"  # in-process: load_weights reachable
    assert len(engine.loaded) == len(set(engine.loaded)) == len(list(model.parameters()))  # tied: once
    for name, p in engine.hf.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_sync_sends_lora_layers_merged_and_leaves_the_trainers_model_untouched(stand_in_vllm, tiny_model_dir):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {n: p.clone() for n, p in model.named_parameters()}
    VLLMRollouts().sync(_module(model))
    engine = stand_in_vllm.instances[0]
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("lora" in n for n in engine.loaded)
    for name, p in engine.hf.state_dict().items():
        assert torch.allclose(p, merged.state_dict()[name], atol=1e-6), name
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(engine.hf.state_dict()["model.layers.0.self_attn.q_proj.weight"], before[q])  # LoRA in
    for n, p in model.named_parameters():  # the trainer's model is left as it was
        assert torch.equal(p, before[n]), n


def test_names_match_transformers_for_plain_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in vllm_weights(model)]
    assert names == [n for n, _ in model.named_parameters()] and "lm_head.weight" not in names  # tied


def test_generate_syncs_once_per_weight_version_and_follows_the_run_seed(stand_in_vllm, tiny_model_dir):
    from cl.core.data import PromptFormat
    from cl.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok, False, None)
    prompts = fmt.prompt_ids(["3+4=", "1+1="])
    backend = VLLMRollouts()
    torch.manual_seed(1)
    a, logps = backend.generate(_module(model, 0, 5), prompts, fmt, 3, 6, 1.0, 1.0)
    assert len(a) == 6 and [len(lp) for lp in logps] == [len(c) for c in a] and all(len(c) <= 6 for c in a)
    assert all(c[-1] == fmt.eos_id or len(c) == 6 for c in a) and all(fmt.eos_id not in c[:-1] for c in a)
    backend.generate(_module(model, 0, 5), prompts, fmt, 3, 6, 1.0, 1.0)  # same weights: no sync
    assert backend.syncs == 1
    backend.generate(_module(model, 0, 6), prompts, fmt, 3, 6, 1.0, 1.0)  # an optimizer step later
    backend.mark_stale()  # a task boundary (averaging may have changed the weights)
    backend.generate(_module(model, 0, 6), prompts, fmt, 3, 6, 1.0, 1.0)
    assert backend.syncs == 3
    torch.manual_seed(1)
    assert VLLMRollouts().generate(_module(model, 0, 5), prompts, fmt, 3, 6, 1.0, 1.0)[0] == a  # seeds from the run RNG


def test_grpo_run_with_the_vllm_backend_samples_from_the_synced_engine(stand_in_vllm, tmp_path, cache_dir):
    from cl.run import run

    cfg = compose_cfg("experiment=smoke", "objective=grpo", "objective.rollout_backend=vllm", "objective.group_size=4",
                      "stream.steps_per_task=4", "stream.batch_size=4", "eval.every_n_steps=null",
                      f"cache_dir={cache_dir}")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed"
    engine = stand_in_vllm.instances[0]
    assert engine.requests == 2 * 4 * 4  # 2 tasks x 4 steps x 4 prompts, all sampled by the engine
    assert engine.resets == 8  # one sync per optimizer step (ppo_epochs=1)
    assert res["metrics"]["compute"]["tokens_generated"] > 0


@pytest.mark.parametrize("shift", [0.0, -0.5])
def test_vllm_rollouts_are_weighted_by_the_trainer_to_sampler_probability_ratio(stand_in_vllm, tiny_model_dir, shift):
    """The engine's per-token log-probs are aligned with the completion tokens and turned into the sampler
    correction: an engine that agrees with the trainer gives weights of 1; one whose log-probs are 0.5 lower
    per token gives e^0.5 on every token it returned a log-prob for (``token_truncate``, cap 3), and 1 on
    the end-of-sequence token it stopped on without one."""
    from cl.core.data import PromptFormat, PromptRowsCollator, TaskExamples
    from cl.model import load_model_and_tokenizer
    from cl.objectives.grpo import GRPOObjective
    from tasks.base import Task

    stand_in_vllm.logprob_shift = shift
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    obj = GRPOObjective(group_size=4, max_new_tokens=6, top_p=1.0, kl_coef=0.0, rollout_backend="vllm",
                        vllm={"importance_sampling": "token_truncate", "is_clip_max": 3.0})
    obj.bind(fmt, {"t": Task("t", train=None, eval=None, verifier=lambda c, **_: [float(len(x) % 2) for x in c])})
    rows = [{"prompt": p, "answer": "1", "task": "t"} for p in ("A:1=", "A:22=", "S:9=")]
    pairs = fmt.encode([r["prompt"] for r in rows], [r["answer"] for r in rows])
    batch = PromptRowsCollator()([TaskExamples(pairs, rows)[i] for i in range(3)])
    for seed in range(20):  # rollouts in which some completion stopped on eos (the random model rarely picks it)
        torch.manual_seed(seed)
        ro = obj.rollout(_module(model), batch)
        m = ro.completion_mask.bool()
        eos = (ro.input_ids[:, 1:] == fmt.eos_id) & m  # completion position t predicts token t + 1
        if eos.any():
            break
    w = ro.is_ratio
    assert w.shape == m.shape and ro.old_logp is None  # one PPO epoch: the current policy stays the old one
    assert (w[~m] == 1).all()
    assert eos.any() and (w[eos] == 1).all()  # the engine returned no log-prob for the eos it stopped on
    torch.testing.assert_close(w[m & ~eos], torch.full_like(w[m & ~eos], math.exp(-shift)), rtol=1e-4, atol=0.0)
    assert abs(float(ro.logs["sampler_logp_diff"]) + shift) < 1e-4
    loss, logs = obj.step(_module(model), batch)
    assert torch.isfinite(loss) and "sampler_is_weight" in logs


def test_vllm_evaluation_pushes_the_current_weights_and_scores_as_hf_generate(stand_in_vllm, tiny_model_dir):
    """eval.backend=vllm: the engine gets the trainer's current weights before an evaluation point and its
    greedy completions (cut after eos) give the scores HF generate gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl.core.data import PromptFormat
    from cl.evaluation import EvalSet, Scorer
    from tasks.registry import build_task

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_model_dir), False, None)
    es = EvalSet.build(build_task("add2", n_train=20, n_eval=12, seed=0), fmt, 12, 0)
    engine = VLLMRollouts()
    for step in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # training between two points
        hf = Scorer(fmt, "generate", max_new_tokens=6)
        via = Scorer(fmt, "generate", max_new_tokens=6, engine=engine)
        want = generate_ids_for(model, es, fmt, 6)
        got = engine.greedy(model, [p for p, _ in es.pairs], fmt, max(len(a) for _, a in es.pairs) + 6)
        assert got == want
        assert via.scores(model, es) == hf.scores(model, es)
    llm = stand_in_vllm.instances[0]
    for name, p in llm.hf.state_dict().items():  # the engine holds the latest weights
        assert torch.equal(p, model.state_dict()[name]), name
    pushes = llm.resets
    es2 = EvalSet.build(build_task("sub2", n_train=20, n_eval=12, seed=0), fmt, 12, 0)
    got = via.item_scores(model, [es, es2])  # one evaluation point, two generation-scored sets
    assert llm.resets == pushes + 1  # one weight push for the point
    assert got == hf.item_scores(model, [es, es2])


def generate_ids_for(model, es, fmt, extra):
    from cl.generation import generate_ids

    return generate_ids(model, [p for p, _ in es.pairs], fmt, max(len(a) for _, a in es.pairs) + extra)


@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_real_vllm_evaluation_gives_hf_generates_greedy_answers(tiny_model_dir):
    """On a GPU with vLLM: the same greedy completions from the engine as from HF generate (tiny model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl.core.data import PromptFormat
    from cl.evaluation import EvalSet
    from tasks.registry import build_task

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_model_dir), False, None)
    es = EvalSet.build(build_task("add2", n_train=20, n_eval=32, seed=0), fmt, 32, 0)
    engine = VLLMRollouts(gpu_memory_utilization=0.2, dtype="float32", enforce_eager=True)
    got = engine.greedy(model, [p for p, _ in es.pairs], fmt, max(len(a) for _, a in es.pairs) + 6)
    assert got == generate_ids_for(model, es, fmt, 6)


def test_vllm_backend_refused_with_a_reason_where_it_cannot_run():
    from cl.validate import ConfigError, validate_config

    if vllm_available() and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here")
    cfg = OmegaConf.to_container(compose_cfg("objective=grpo", "objective.rollout_backend=vllm"), resolve=True)
    with pytest.raises(ConfigError, match=r"objective.rollout_backend: (vLLM is not installed|needs a CUDA GPU)"):
        validate_config(cfg)
    cfg = OmegaConf.to_container(compose_cfg("objective=grpo", "objective.rollout_backend=vllm",
                                             "objective.vllm.importance_sampling=clip",
                                             "objective.vllm.is_clip_min=4"), resolve=True)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "objective.vllm.importance_sampling: 'clip' is not one of token_truncate" in str(err.value)
    assert "objective.vllm.is_clip_min: 4.0 is above is_clip_max 3.0" in str(err.value)
    with pytest.raises(ValueError, match="objective.vllm.importance_sampling: 'clip'"):
        VLLMRollouts(importance_sampling="clip")
    assert VLLMRollouts(importance_sampling="none").correction is None
    cfg = OmegaConf.to_container(compose_cfg("objective=grpo", "objective.rollout_backend=sglang"), resolve=True)
    with pytest.raises(ConfigError, match="objective.rollout_backend: 'sglang' is not one of hf, hf_fast, vllm"):
        validate_config(cfg)
    assert HFRollouts().name == "hf"


@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_real_vllm_rollouts(tmp_path, cache_dir):
    from cl.run import run

    cfg = compose_cfg("experiment=smoke", "objective=grpo", "objective.rollout_backend=vllm", "trainer=gpu",
                      "stream.steps_per_task=4", f"cache_dir={cache_dir}")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed" and res["metrics"]["compute"]["tokens_generated"] > 0


# ---- rollout_backend=hf_fast: the minimal decode loop against transformers' generate ----

def _fast_setup(tiny_model_dir):
    from cl.core.data import PromptFormat
    from cl.model import load_model_and_tokenizer
    from tasks.registry import build_task

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    fmt = PromptFormat(tok)
    # prompts of different lengths (left padding, per-row positions) from two task families
    texts = list(build_task("add2", 40, 10, 1).train["prompt"][:6]) + list(build_task("count8", 40, 10, 2).train["prompt"][:6]) + list(build_task("mul21", 40, 10, 3).train["prompt"][:4])
    return model, fmt, fmt.prompt_ids(texts)


def test_fast_decode_gives_generates_greedy_tokens_and_its_samples_for_the_same_rng(tiny_model_dir):
    from cl.generation import decode_ids, generate_ids

    model, fmt, prompts = _fast_setup(tiny_model_dir)
    assert len({len(p) for p in prompts}) > 1
    greedy = generate_ids(model, prompts, fmt, 12)
    assert decode_ids(model, prompts, fmt, 12) == greedy
    # one sequence per prompt: the same forward shapes as generate, so the same draws give the same tokens
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        torch.manual_seed(5)
        a = generate_ids(model, prompts, fmt, 12, do_sample=True, temperature=temperature, top_p=top_p)
        torch.manual_seed(5)
        b = decode_ids(model, prompts, fmt, 12, do_sample=True, temperature=temperature, top_p=top_p)
        assert a == b, (temperature, top_p)
    # min_new_tokens from the generation config is honoured (no eos before it)
    model.generation_config.min_new_tokens = 12
    assert all(len(r) == 12 for r in decode_ids(model, prompts, fmt, 12, do_sample=True))


def test_fast_decode_shared_prefill_gives_the_same_next_token_distribution(tiny_model_dir):
    """With n > 1 completions per prompt each prompt is prefilled once and its cache repeated; the
    distribution each row samples from equals the one from prefilling every copy (to float rounding)."""
    from transformers import DynamicCache

    from cl.core.data import collate_prompts

    model, fmt, prompts = _fast_setup(tiny_model_dir)
    model.eval()
    n = 4
    b = collate_prompts(prompts, fmt.pad_id)
    pos = (b["attention_mask"].cumsum(-1) - 1).masked_fill(b["attention_mask"] == 0, 0)
    with torch.no_grad():
        once = DynamicCache(config=model.config)
        l1 = model(**b, position_ids=pos, cache=once, use_cache=True).logits[:, -1].repeat_interleave(n, 0)
        once.batch_repeat_interleave(n)
        every = DynamicCache(config=model.config)
        rep = {k: v.repeat_interleave(n, 0) for k, v in b.items()}
        l2 = model(**rep, position_ids=pos.repeat_interleave(n, 0), cache=every, use_cache=True).logits[:, -1]
        torch.testing.assert_close(l1.softmax(-1), l2.softmax(-1), atol=1e-6, rtol=1e-5)
        # and the next step from either cache
        nxt = l2.argmax(-1)[:, None]
        mask = torch.cat([rep["attention_mask"], torch.ones_like(nxt)], -1)
        p = pos.repeat_interleave(n, 0)[:, -1:] + 1
        s1 = model(input_ids=nxt, attention_mask=mask, position_ids=p, cache=once, use_cache=True).logits
        s2 = model(input_ids=nxt, attention_mask=mask, position_ids=p, cache=every, use_cache=True).logits
        torch.testing.assert_close(s1.softmax(-1), s2.softmax(-1), atol=1e-6, rtol=1e-5)


def test_fast_decode_group_samples_follow_the_models_distribution(tiny_model_dir):
    """End to end with n > 1: the first sampled token's frequencies over many draws match the model's
    next-token probabilities (a chi-square bound loose enough for any machine, tight enough to catch a
    wrong temperature, top-p or position)."""
    from cl.generation import decode_ids

    model, fmt, prompts = _fast_setup(tiny_model_dir)
    prompt = prompts[0]
    n = 4000
    torch.manual_seed(0)
    firsts = [r[0] for r in decode_ids(model, [prompt], fmt, 1, do_sample=True, temperature=0.8,
                                       num_return_sequences=n)]
    with torch.no_grad():
        probs = (model(input_ids=torch.tensor([prompt])).logits[0, -1] / 0.8).softmax(-1)
    counts = torch.bincount(torch.tensor(firsts), minlength=probs.numel()).float()
    keep = probs * n >= 5  # chi-square cells with enough expected counts; the rest pooled
    exp = torch.cat([probs[keep] * n, (probs[~keep].sum() * n).view(1)])
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)  # ~ mean + 6 sd of chi2(dof)


def test_grpo_run_with_hf_fast_rollouts_and_its_fsdp_refusal(tmp_path, cache_dir):
    """A GRPO run through hf_fast completes and generates; the backend is refused under FSDP."""
    from cl.run import run

    cfg = compose_cfg("experiment=smoke", "objective=grpo", "objective.rollout_backend=hf_fast",
                      "objective.group_size=4", "stream.steps_per_task=3", "stream.batch_size=4",
                      "eval.every_n_steps=null", f"cache_dir={cache_dir}")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed"
    assert res["metrics"]["compute"]["tokens_generated"] > 0
    from cl.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="hf_fast"):
        validate_config(compose_cfg("objective=grpo", "objective.rollout_backend=hf_fast", "trainer=fsdp"))


def test_grpo_run_with_hf_fasts_compiled_step_and_its_refusal_elsewhere(tmp_path, cache_dir, monkeypatch):
    """``objective.rollout_compile=true``: a GRPO run decodes through the compiled step and completes; with
    another rollout backend the setting is refused."""
    from torch._dynamo.utils import counters

    from cl import fastdecode
    from cl.run import run
    from cl.validate import ConfigError, validate_config

    if fastdecode.cxx_compiler() is None:
        pytest.skip("torch.compile on CPUs needs a C++ compiler")
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    calls = []
    real = fastdecode.compiled_step
    monkeypatch.setattr(fastdecode, "compiled_step", lambda: calls.append(1) or real())
    cfg = compose_cfg("experiment=smoke", "objective=grpo", "objective.rollout_backend=hf_fast",
                      "objective.rollout_compile=true", "objective.group_size=4", "stream.steps_per_task=2",
                      "stream.batch_size=4", "eval.every_n_steps=null", f"cache_dir={cache_dir}")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed" and res["metrics"]["compute"]["tokens_generated"] > 0
    assert calls and counters["stats"]["unique_graphs"] > before  # decode steps ran compiled, not eagerly
    with pytest.raises(ConfigError, match=r"objective.rollout_compile: compiles hf_fast's decode step; "
                                          r"rollout_backend is hf"):
        validate_config(compose_cfg("objective=grpo", "objective.rollout_compile=true"))
    monkeypatch.setattr("cl.fastdecode.cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match=r"objective.rollout_compile: torch.compile needs a C\+\+ compiler"):
        validate_config(compose_cfg("objective=grpo", "objective.rollout_backend=hf_fast",
                                    "objective.rollout_compile=true"))
