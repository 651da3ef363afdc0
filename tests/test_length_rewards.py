"""Length-aware GRPO rewards (GRPO-lambda, HAPO) on hand-made groups, and their wiring into the objective."""

from __future__ import annotations

import math

import pytest
import torch

from cl.objectives.length_rewards import grpo_lambda_terms, hapo_terms, kimi_length_reward


def test_kimi_length_reward_rewards_short_correct_and_never_short_wrong():
    lengths = torch.tensor([10, 20, 30, 10])
    correct = torch.tensor([1, 1, 0, 0])
    # 0.5 - (L - 10) / 20: 0.5, 0, -0.5, 0.5 -> wrong ones clipped at 0 from above
    assert kimi_length_reward(lengths, correct).tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0])
    assert kimi_length_reward(torch.tensor([7, 7]), torch.tensor([1, 0])).tolist() == [0.0, 0.0]


def test_grpo_lambda_penalises_only_the_most_often_correct_groups():
    lengths = torch.tensor([[10, 30], [10, 30], [10, 30], [10, 30]])
    correct = torch.tensor([[0, 0], [1, 1], [1, 0], [1, 1]])  # ratios 0, 1, .5, 1
    terms, chosen = grpo_lambda_terms(lengths, correct, fraction=0.5)
    assert chosen.tolist() == [False, True, False, True]  # the two groups with ratio 1
    assert terms.tolist() == [[0.0, 0.0], [0.5, -0.5], [0.0, 0.0], [0.5, -0.5]]
    terms, chosen = grpo_lambda_terms(lengths, correct, fraction=0.75)  # ceil(3): the 0.5 group too
    assert chosen.tolist() == [False, True, True, True] and terms[2].tolist() == [0.5, -0.5]
    terms, chosen = grpo_lambda_terms(lengths, correct, fraction=0.0)
    assert not chosen.any() and not terms.any()  # plain GRPO


def test_hapo_measures_against_each_problems_shortest_correct_history():
    history: dict[str, int] = {}
    # first sight: no record, no length term; the record becomes the shortest correct length (20)
    t = hapo_terms(torch.tensor([[20, 40, 5]]), torch.tensor([[1, 1, 0]]), ["p"], history)
    assert t.tolist() == [[0.0, 0.0, 0.0]] and history == {"p": 20}
    # against h = 20: L=10 correct -> cos(pi/4); L=20 -> 0; L=50 (>= 2h) -> -1; short wrong -> 0, long wrong -> f
    t = hapo_terms(torch.tensor([[10, 20, 50, 5, 30]]), torch.tensor([[1, 1, 1, 0, 0]]), ["p"], history)
    assert t[0].tolist() == pytest.approx([math.cos(math.pi / 4), 0.0, -1.0, 0.0, math.cos(0.75 * math.pi)], abs=1e-6)
    assert history == {"p": 10}  # the new record
    # a group without a correct completion keeps the record; another problem has its own
    hapo_terms(torch.tensor([[3, 4]]), torch.tensor([[0, 0]]), ["p"], history)
    hapo_terms(torch.tensor([[8, 9]]), torch.tensor([[0, 1]]), ["q"], history)
    assert history == {"p": 10, "q": 9}


@pytest.mark.parametrize("kind", ["grpo_lambda", "hapo"])
def test_the_objective_adds_the_term_to_the_task_reward_and_checkpoints_the_history(kind):
    from cl.objectives.grpo import GRPOObjective

    obj = GRPOObjective(group_size=2, length_reward=kind, length_weight=0.5, lambda_fraction=1.0)
    rows = [{"task": "t", "prompt": "a"}, {"task": "t", "prompt": "b"}]
    comps = [[1] * 4, [1] * 8, [1] * 6, [1] * 2]
    raw, passed = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    shaped, logs = obj._length_shaped(raw, passed, comps, rows)
    if kind == "grpo_lambda":  # both groups penalised: lengths (4, 8) -> (+.5, -.5); (6 correct, 2 wrong) -> (-.5, 0)
        assert shaped.tolist() == pytest.approx([1.25, 0.75, 0.75, 0.0])  # x length_weight 0.5
        assert float(logs["length_penalised_frac"]) == 1.0
    else:
        assert shaped.tolist() == [1.0, 1.0, 1.0, 0.0] and obj.length_history == {"t\x00a": 4, "t\x00b": 6}
        shaped, _ = obj._length_shaped(raw, passed, comps, rows)
        assert shaped.tolist() == pytest.approx([1.0, 1.0 + 0.5 * math.cos(math.pi), 1.0, 0.0])
    assert "length_history" in GRPOObjective.ckpt_attrs
    with pytest.raises(ValueError, match="length_reward"):
        GRPOObjective(length_reward="short")


def test_length_rewards_with_several_processes_are_refused_in_one_line():
    from omegaconf import OmegaConf

    from cl.validate import ConfigError, validate_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg("objective=grpo", "objective.length_reward=hapo", "trainer=ddp_cpu")
    with pytest.raises(ConfigError, match="objective.length_reward: length rewards keep per-problem records"):
        validate_config(OmegaConf.to_container(cfg, resolve=False))
