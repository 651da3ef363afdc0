"""Cross-check of the GRPO loss and advantages against TRL's ``GRPOTrainer`` on the same model and batch.

TRL computes the loss of one batch in ``GRPOTrainer._compute_loss`` from prompt/completion ids, the
advantages and the old/reference per-token log-probs; we feed both implementations identical inputs
(old and reference log-probs perturbed so that clipping and the KL term are exercised) and compare the
loss and every parameter gradient. Aggregation names map as: token_mean = TRL ``bnpo``,
seq_mean_token_mean = TRL ``grpo``, seq_mean_token_sum_norm = TRL ``dr_grpo``.
"""

import pytest
import torch

trl = pytest.importorskip("trl")

from cl.core.data import PromptFormat  # noqa: E402
from cl.model import load_model_and_tokenizer  # noqa: E402
from cl.objectives.grpo import token_logprobs  # noqa: E402
from cl.objectives.grpo_loss import group_advantages, grpo_loss, sampler_correction  # noqa: E402

TRL_LOSS_TYPE = {"token_mean": "bnpo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}


def _trl_trainer(model, tokenizer, out, loss_type: str, beta: float, max_len: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # bf16=False: TRL defaults to bf16 autocast, which would make the comparison one of precisions.
    # use_bias_correction_kl=False: TRL >= 1.x multiplies the k3 term by the ratio by default (DeepSeek-V3.2);
    # The GRPO of docs/methods.md section 2 (DeepSeekMath, verl) adds the plain k3 term, as ours does.
    args = GRPOConfig(output_dir=str(out), loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.3,
                      max_completion_length=max_len, num_generations=4, per_device_train_batch_size=8,
                      temperature=1.0, report_to="none", use_cpu=True, bf16=False,
                      use_bias_correction_kl=False, logging_steps=1000, save_strategy="no")
    data = Dataset.from_list([{"prompt": "A2:12+34="}] * 8)
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                       train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("mode", list(TRL_LOSS_TYPE))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl(tiny_model_dir, tmp_path, mode, beta):
    _compare_with_trl(tiny_model_dir, tmp_path, mode, beta)


@pytest.mark.parametrize("mode,correction", [("token_mean", "token_truncate"), ("seq_mean_token_mean", "sequence_mask")])
def test_sampler_corrected_loss_and_gradients_equal_trl(tiny_model_dir, tmp_path, mode, correction):
    """vLLM rollouts: the importance weights multiply the surrogate, not the KL term, as in TRL (its
    ``vllm_importance_sampling_correction``, set on the trainer here: building one with vLLM needs vLLM)."""
    _compare_with_trl(tiny_model_dir, tmp_path, mode, 0.04, correction)


def _compare_with_trl(tiny_model_dir, tmp_path, mode, beta, correction=None):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    model.train()
    fmt = PromptFormat(tok)
    g = torch.Generator().manual_seed(0)
    B, P, T = 8, 10, 6
    prompt_ids = torch.tensor(fmt.prompt_ids(["A2:12+34=", "A2:56+07=", "S2:98-76=", "S2:44-12="] * 2))
    assert prompt_ids.shape == (B, P)
    completion_ids = torch.randint(4, 40, (B, T), generator=g)
    cmask = torch.ones(B, T, dtype=torch.long)
    cmask[1, 3:] = 0
    cmask[6, 1:] = 0
    completion_ids[cmask == 0] = fmt.pad_id
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), cmask], 1)
    with torch.no_grad():
        cur = token_logprobs(model, ids, attn)[:, P - 1:]
    old = cur + 0.3 * torch.randn(B, T, generator=g)
    ref = cur + 0.5 * torch.randn(B, T, generator=g)
    adv = group_advantages(torch.rand(B, generator=g), 4)
    weights = None
    if correction is not None:  # a sampler whose log-probs differ from the trainer's: some weights clipped/zeroed
        weights = sampler_correction(old, old + 0.4 * torch.randn(B, T, generator=g), cmask, correction, None, 1.5)
        assert (weights != 1).any() and ((weights == 1.5).any() or (weights == 0).any())

    trainer = _trl_trainer(model, tok, tmp_path, TRL_LOSS_TYPE[mode], beta, T)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": cmask.sum()}
    if weights is not None:
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        inputs["importance_sampling_ratio"] = weights
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() per window; one step here
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    g_theirs = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logp = token_logprobs(model, ids, attn)[:, P - 1:]
    ours, _ = grpo_loss(logp, old, adv, cmask.float(), 0.2, 0.3, beta, ref, mode, max_len=T, is_ratio=weights)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_theirs[n], rtol=1e-4, atol=1e-7, msg=n)


def test_group_advantages_equal_trl_formula():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.9, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0])
    G = 4
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
    torch.testing.assert_close(group_advantages(r, G, "grpo", eps=1e-4), (r - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(r, G, "dr_grpo"), r - mean)  # TRL scale_rewards="none"


def test_sampler_correction_modes_follow_trl():
    """TRL's ``vllm_importance_sampling_mode`` semantics on hand-checkable numbers: per-token or summed
    per-sequence log-ratios, clipped (truncate) or zeroed (mask) outside the bounds, padding and tokens
    without a sampler log-prob counting as ratio 1."""
    old = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    sample = torch.tensor([[-1.0, -1.0, float("nan")], [-0.5, 0.5, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    e = torch.e
    torch.testing.assert_close(sampler_correction(old, sample, mask, "token_truncate", None, 2.0),
                               torch.tensor([[2.0, 1.0, 1.0], [1.0, 1 / e, 1.0]]))
    torch.testing.assert_close(sampler_correction(old, sample, mask, "token_mask", 0.5, 2.0),
                               torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    torch.testing.assert_close(sampler_correction(old, sample, mask, "sequence_truncate", 0.5, 2.0),
                               torch.tensor([[2.0], [0.5]]))
    torch.testing.assert_close(sampler_correction(old, sample, mask, "sequence_mask", None, 3.0),
                               torch.tensor([[e], [1 / e]]))
    with pytest.raises(ValueError, match="not one of"):
        sampler_correction(old, sample, mask, "token_clip")
