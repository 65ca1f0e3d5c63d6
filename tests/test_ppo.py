"""PPO: its maths against hand-computed values, rollouts whose log-probs training recomputes exactly,
and proofs that it learns from a text reward and from images, resumes exactly, and runs end to end."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from builders_lm import build_tiny_gpt2_base
from conftest import MODIFIERS, SUBJECTS
from safetensors.torch import load_file

from trainer.checkpoint import list_checkpoints
from trainer.policy.ppo import (
    PPOConfig,
    adaptive_beta,
    gae,
    masked_whiten,
    ppo_losses,
    response_logprobs,
    rloo_advantages,
    rollout,
    rollout_batch,
    train_ppo,
)
from trainer.policy.rewards import BaselineCache, ImageReward, RewardBatch, TextReward
from trainer.progress import StopTraining

WORD = "fantasy"  # a modifier the tiny SFT policy knows but rarely puts in its top rewrite
PPO_PROMPTS, HELD_OUT = SUBJECTS[:12], SUBJECTS[12:]


# --- the maths ------------------------------------------------------------------------------------

def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])  # the 9 is after the response: ignored
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta = r + V(next) - V: [0.2-0.5, 0.4-0.2, 1-0.4] = [-0.3, 0.2, 0.6]; A_t = delta_t + 0.5 A_{t+1}
    a2 = 0.6
    a1 = 0.2 + 0.5 * a2
    a0 = -0.3 + 0.5 * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))


def test_whitening_uses_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    white = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    assert torch.allclose(white[mask.bool()], expected, atol=1e-5)
    assert torch.equal(white[~mask.bool()], torch.zeros(3))


def test_ppo_losses_clip_the_ratio_and_the_value_as_written():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    policy_loss, value_loss, stats = ppo_losses(new, old, adv, values, old_values, returns, mask, clip_range=0.2,
                                                value_clip_range=0.2, normalizer=2.0)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert policy_loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: max(1, 1) = 1 -> 0.5 * 2 / 2
    assert value_loss.item() == pytest.approx(0.5)
    assert stats["clip_frac"] == 2.0


def test_adaptive_beta_moves_toward_the_target_and_is_bounded():
    assert adaptive_beta(0.2, 12.0, 100, target=6.0, horizon=1000) == pytest.approx(0.2 * (1 + 0.2 * 0.1))
    assert adaptive_beta(0.2, 3.0, 100, target=6.0, horizon=1000) == pytest.approx(0.2 * (1 - 0.2 * 0.1))
    assert adaptive_beta(0.2, 6.0, 100, target=6.0, horizon=1000) == pytest.approx(0.2)


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_prompts_other_rewrites():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three rewrites each
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(rloo_advantages(rewards, 3), expected)


# --- a tiny SFT policy that sometimes writes WORD -------------------------------------------------

@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> Path:
    from trainer.policy.sft import SFTConfig, train_sft

    root = tmp_path_factory.mktemp("ppo")
    rng = random.Random(0)
    pairs = []
    for subject in SUBJECTS:
        for _ in range(20):
            mods = rng.sample(MODIFIERS + ["red", "blue"], rng.randint(2, 4))
            pairs.append({"source": subject, "target": subject + ", " + ", ".join(mods), "split": "train"})
    base = build_tiny_gpt2_base(root / "base", [p["target"] for p in pairs])
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    train_sft(SFTConfig(pairs=str(root / "pairs.jsonl"), base=str(base), out=str(root / "sft"), max_steps=200,
                        batch_size=16, effective_batch_size=16, lr=3e-3, warmup_steps=10, save_every=0,
                        eval_every=0, tensorboard=False, select="last"))
    (root / "prompts.txt").write_text("\n".join(PPO_PROMPTS) + "\n")
    return root


def word_reward(plains, rewrites):
    return [float(WORD in r.replace(",", " ").split()) for r in rewrites]


def word_rate(folder: Path, prompts) -> float:
    """How often the policy's greedy rewrite holds WORD."""
    from transformers import AutoModelForCausalLM

    from promptist_core.optimizer import PromptOptimizer
    from promptist_core.weights import load_tokenizer

    optimizer = PromptOptimizer(AutoModelForCausalLM.from_pretrained(str(folder)), load_tokenizer(folder))
    return sum(WORD in r.prompt.replace(",", " ").split() for r in optimizer(list(prompts), num_beams=1, max_new_tokens=30)) / len(prompts)


def _config(root: Path, out: Path, **overrides) -> PPOConfig:
    settings = dict(prompts=str(root / "prompts.txt"), policy=str(root / "sft"), out=str(out), iterations=40,
                    batch_size=8, num_beam_groups=16, min_new_tokens=10, max_new_tokens=30, lr=2e-4,
                    trainable_top_blocks=0, beta=0.05, save_every=10, sample_every=10, tensorboard=False)
    settings.update(overrides)
    return PPOConfig(**settings)


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_recomputes_exactly_the_log_probs_of_the_generation(sft_policy):
    """A mismatch here is the usual cause of 'negative KL': check every token of every candidate."""
    from promptist_core.diverse_beam import diverse_beam_search
    from trainer.policy.sft import load_trainable_policy

    lm, tokenizer = load_trainable_policy(str(sft_policy / "sft"))
    lm.eval()
    prompts = ["a cat riding a bike", "a castle on a hill on a clear day"]
    ids = [tokenizer(p + " Rephrase:", add_special_tokens=False)["input_ids"] for p in prompts]
    width, eos = max(map(len, ids)), tokenizer.eos_token_id
    input_ids = torch.tensor([[eos] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    out = diverse_beam_search(lm, input_ids, mask, num_beams=4, num_beam_groups=4, diversity_penalty=0.0,
                              num_return_sequences=4, max_new_tokens=40, length_penalty=0.0, eos_token_id=eos,
                              pad_token_id=eos)
    responses, prompt_ids, scores = [], [], []
    for k, row in enumerate(out.sequences[:, width:].tolist()):
        if eos in row:  # finished candidates: their score is the sum of their tokens' log-probs, eos included
            responses.append(row[:row.index(eos) + 1])
            prompt_ids.append(ids[k // 4])
            scores.append(out.sequence_scores[k].item())
    assert len(responses) >= 4
    batch, start, length, rmask = rollout_batch(prompt_ids, responses, eos, torch.device("cpu"))
    with torch.no_grad():
        logprobs, _ = response_logprobs(lm, batch, start, length)
    assert torch.allclose((logprobs * rmask).sum(1), torch.tensor(scores), atol=1e-4)


def test_rollouts_repeat_exactly_for_the_same_seed_iteration_and_rank(sft_policy):
    from trainer.policy.sft import load_trainable_policy

    lm, tokenizer = load_trainable_policy(str(sft_policy / "sft"))
    config = _config(sft_policy, sft_policy / "unused")
    first = rollout(lm.eval(), tokenizer, PPO_PROMPTS[:4], config, iteration=3, rank=0)
    again = rollout(lm, tokenizer, PPO_PROMPTS[:4], config, iteration=3, rank=0)
    other = rollout(lm, tokenizer, PPO_PROMPTS[:4], config, iteration=4, rank=0)
    assert first == again
    assert (first.max_new_tokens, first.responses) != (other.max_new_tokens, other.responses)
    assert all(r[-1] == tokenizer.eos_token_id for r in first.responses)


@pytest.mark.parametrize("how", ["beam", "sample"])
def test_a_kept_prompt_is_in_the_query_and_the_policy_is_trained_on_its_own_tokens_only(sft_policy, how):
    """With keep_prompt the rollout's query ends with the plain prompt; the response (what log-probs, KL,
    values and the DF-Prompt heads see) is only what the policy wrote, and the rewrite is prompt + response."""
    from promptist_core.optimizer import forced_start, join_kept
    from trainer.policy.sft import load_trainable_policy

    lm, tokenizer = load_trainable_policy(str(sft_policy / "sft"))
    config = _config(sft_policy, sft_policy / "unused", keep_prompt=True, no_repeat_ngram_size=2, rollout=how)
    got = rollout(lm.eval(), tokenizer, PPO_PROMPTS[:4], config, iteration=0, rank=0)
    for plain, query, response, rewrite in zip(PPO_PROMPTS[:4], got.prompt_ids, got.responses, got.rewrites,
                                               strict=True):
        forced = tokenizer(forced_start(plain), add_special_tokens=False)["input_ids"]
        assert query[-len(forced):] == forced
        written = tokenizer.decode(response[:-1], skip_special_tokens=True)
        assert rewrite == join_kept(plain, written)
        grams = [tuple(response[i:i + 2]) for i in range(len(response) - 2)]  # the eos excluded
        assert len(grams) == len(set(grams))


# --- it learns --------------------------------------------------------------------------------------

def test_text_reward_ppo_learns_the_rewarded_word_on_held_out_prompts_and_a_large_beta_holds_it_back(sft_policy,
                                                                                                    tmp_path):
    before = word_rate(sft_policy / "sft", HELD_OUT + PPO_PROMPTS)
    assert before <= 0.25
    result = train_ppo(_config(sft_policy, tmp_path / "ppo"), TextReward(word_reward))
    rewards = [float(r["reward"]) for r in _log(tmp_path / "ppo")]
    assert sum(rewards[-5:]) / 5 >= sum(rewards[:5]) / 5 + 0.4, rewards
    assert word_rate(result.out, HELD_OUT) >= 0.75
    kls = [float(r["kl"]) for r in _log(tmp_path / "ppo")]
    assert max(kls) < 30 and kls[0] == 0.0  # policy == reference at the first rollout

    # The same run with beta 10: the KL penalty keeps the policy near the reference, and the reward low.
    train_ppo(_config(sft_policy, tmp_path / "held", iterations=20, beta=10.0), TextReward(word_reward))
    held_kls = [float(r["kl"]) for r in _log(tmp_path / "held")]
    held_rewards = [float(r["reward"]) for r in _log(tmp_path / "held")]
    assert sum(held_kls[-10:]) / 10 < sum(kls[-10:]) / 10 / 3, (held_kls, kls)
    assert sum(held_rewards[-5:]) / 5 < sum(rewards[-5:]) / 5 - 0.3, (held_rewards, rewards)


def test_rloo_without_a_value_model_learns_the_word_too(sft_policy, tmp_path):
    result = train_ppo(_config(sft_policy, tmp_path / "rloo", advantage="rloo", rloo_samples=4, iterations=25),
                       TextReward(word_reward))
    rewards = [float(r["reward"]) for r in _log(tmp_path / "rloo")]
    assert sum(rewards[-5:]) / 5 >= sum(rewards[:5]) / 5 + 0.3, rewards
    assert word_rate(result.out, HELD_OUT) >= 0.5
    assert "value" not in list_checkpoints(tmp_path / "rloo")[-1].state["extra"]


class SolidColours:
    """An ImageGenerator that paints the whole image red when the prompt says red, blue otherwise."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, seeds, *, steps, guidance, size):
        self.calls.append(list(prompts))
        red = torch.tensor([0.9, 0.1, 0.1])
        blue = torch.tensor([0.1, 0.1, 0.9])
        colours = [red if "red" in p.replace(",", " ").split() else blue for p in prompts]
        return torch.stack([c.expand(size[1], size[0], 3) for c in colours])


@pytest.fixture(scope="module")
def red_loving_scorer(tiny_clip_models_dir):
    """The tiny CLIP with an aesthetic head built to prefer red: its direction is e(red) - e(blue)."""
    from promptist_core.aesthetic import AestheticHead
    from promptist_core.clip_models import load_clip
    from promptist_core.rewards import RewardScorer

    clip = load_clip("tiny-open-clip-hub", models_dir=tiny_clip_models_dir, device="cpu")
    images = SolidColours().generate(["red", "blue"], [0, 0], steps=1, guidance=0, size=(32, 32))
    e = torch.nn.functional.normalize(clip.encode_images(images), dim=-1)
    head = AestheticHead("linear", embed_dim=e.shape[1])
    with torch.no_grad():
        direction = e[0] - e[1]
        head.linear.weight.copy_(10 * direction / direction.norm())
        head.linear.bias.zero_()
    return RewardScorer(clip, head, preset="promptist")


def test_image_reward_pairs_seeds_and_caches_the_plain_prompts_scores(red_loving_scorer):
    generator = SolidColours()
    reward = ImageReward(generator, red_loving_scorer, images_per_prompt=2, steps=1, size=(32, 32))
    first = reward(["a cat", "a dog"], ["a cat, red", "a dog, blue"])
    assert first.total[0] > first.total[1] and first.terms["aes"][1] == pytest.approx(0.0, abs=1e-5)
    assert generator.calls[0] == ["a cat", "a cat", "a dog", "a dog"]  # the plain prompts, once
    reward(["a cat", "a dog"], ["a cat, red", "a dog"])
    assert generator.calls[2:] == [["a cat, red", "a cat, red", "a dog", "a dog"]]  # no plain images again
    assert reward.cache.hits == 4 and reward.cache.misses == 4


def test_image_reward_ppo_moves_the_policy_toward_the_colour_the_head_prefers(sft_policy, red_loving_scorer,
                                                                             tmp_path):
    global WORD
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PPO_PROMPTS))
    reward = ImageReward(SolidColours(), red_loving_scorer, preset=red_loving_scorer.preset.with_weights(relevance=0),
                         images_per_prompt=1, steps=1, size=(32, 32))
    result = train_ppo(_config(sft_policy, tmp_path / "ppo", prompts=str(prompts)), reward,
                       baseline_cache=reward.cache)
    rewards = [float(r["reward"]) for r in _log(tmp_path / "ppo") if r["reward"]]  # step 0: validation only
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.5 * rewards[0] + 0.5, rewards
    saved, WORD = WORD, "red"
    try:
        plain_held_out = [p for p in HELD_OUT if "red" not in p.split()]
        assert word_rate(sft_policy / "sft", plain_held_out) <= 0.34
        assert word_rate(result.out, plain_held_out) >= 0.66
    finally:
        WORD = saved
    state = list_checkpoints(tmp_path / "ppo")[-1].state
    assert len(state["baseline_cache"]) == len(PPO_PROMPTS)  # one plain image each, kept with the checkpoint


# --- resume, CLI, end to end --------------------------------------------------------------------------

def test_stopped_ppo_resumes_to_identical_weights_and_logged_rewards(sft_policy, tmp_path):
    settings = dict(iterations=6, save_every=2, trainable_top_blocks=1, minibatch_size=4)
    train_ppo(_config(sft_policy, tmp_path / "full", **settings), TextReward(word_reward))

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise StopTraining("test")

    with pytest.raises(StopTraining):
        train_ppo(_config(sft_policy, tmp_path / "stopped", **settings), TextReward(word_reward), callback=stop_at_3)
    train_ppo(_config(sft_policy, tmp_path / "stopped", **settings), TextReward(word_reward), resume=True)
    for name in ("model.safetensors", "value.safetensors"):
        full = load_file(str(list_checkpoints(tmp_path / "full")[-1].folder / name))
        got = load_file(str(list_checkpoints(tmp_path / "stopped")[-1].folder / name))
        assert all(torch.equal(full[k], got[k]) for k in full), name
    assert _log(tmp_path / "full") == _log(tmp_path / "stopped")
    assert not (tmp_path / "full" / "samples").exists()  # a text reward has no images: no validation


def test_validation_grids_valid_reward_and_best_leave_training_and_resume_bit_exact(sft_policy, red_loving_scorer,
                                                                                     tmp_path):
    """Plain vs the current policy on fixed held-out prompts at 0, every 2 and at the end; the weights equal a
    run without validation (it draws from no training RNG), and a stopped run resumes to the same weights,
    log and validation results."""
    from promptist_core.optimizer import load_optimizer

    def run(out, callback=None, resume=False, **overrides):
        reward = ImageReward(SolidColours(), red_loving_scorer, preset=red_loving_scorer.preset.with_weights(relevance=0),
                             images_per_prompt=1, steps=1, size=(32, 32))
        settings = dict(iterations=5, save_every=2, trainable_top_blocks=1, minibatch_size=4, valid_every=2,
                        valid_count=3, keep_best_valid=True)
        settings.update(overrides)
        return train_ppo(_config(sft_policy, out, **settings), reward, callback=callback, resume=resume,
                         baseline_cache=reward.cache)

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise StopTraining("test")

    run(tmp_path / "full")
    run(tmp_path / "plain", valid_every=0)
    with pytest.raises(StopTraining):
        run(tmp_path / "stopped", callback=stop_at_3)
    run(tmp_path / "stopped", resume=True)
    for other in ("plain", "stopped"):
        for name in ("model.safetensors", "value.safetensors"):
            full = load_file(str(list_checkpoints(tmp_path / "full")[-1].folder / name))
            got = load_file(str(list_checkpoints(tmp_path / other)[-1].folder / name))
            assert all(torch.equal(full[k], got[k]) for k in full), (other, name)
    rows = _log(tmp_path / "full")
    hits = "baseline_hits"  # a count of this process's cache look-ups: it restarts with the resumed process
    assert [{k: v for k, v in r.items() if k != hits} for r in _log(tmp_path / "stopped")] == \
        [{k: v for k, v in r.items() if k != hits} for r in rows]
    assert [r["step"] for r in rows if r["valid_reward"]] == ["0", "2", "4", "5"]
    trained = [{k: v for k, v in r.items() if not k.startswith("valid")} for r in rows if r["step"] != "0"]
    assert trained == [{k: v for k, v in r.items() if not k.startswith("valid")} for r in _log(tmp_path / "plain")]
    for step in (0, 2, 4, 5):
        folder = f"samples/iter-{step:06d}"
        assert (tmp_path / "full" / folder / "grid.png").is_file()
        full, got = (json.loads((tmp_path / run_ / folder / "summary.json").read_text()) for run_ in ("full", "stopped"))
        assert full == got and full["metric"] == "total_promptist" and full["settings"]["prompts"] == 3
    assert not (tmp_path / "plain" / "samples").exists() and not (tmp_path / "plain" / "best").exists()
    best = json.loads((tmp_path / "full" / "best" / "valid.json").read_text())
    logged = {int(r["step"]): float(r["valid_reward"]) for r in rows if r["valid_reward"]}
    assert best["iteration"] == max(logged, key=lambda s: (logged[s], -s))
    assert best == json.loads((tmp_path / "stopped" / "best" / "valid.json").read_text())
    assert load_optimizer(str(tmp_path / "full" / "best"), device="cpu")("a cat", max_new_tokens=10)[0].prompt


def test_ppo_cli_with_a_text_reward_runs_resumes_and_its_output_loads(sft_policy, tmp_path, capsys, monkeypatch):
    from promptist_core.cli import main as promptist_main
    from trainer.cli import main

    (tmp_path / "my_rewards.py").write_text(
        "def likes_fantasy(plains, rewrites):\n    return [float('fantasy' in r) for r in rewrites]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["ppo", "--prompts", str(sft_policy / "prompts.txt"), "--policy", str(sft_policy / "sft"),
            "--text-reward", "my_rewards:likes_fantasy", "--out", str(tmp_path / "out"), "--batch-size", "4",
            "--num-beam-groups", "4", "--max-new-tokens", "20", "--no-progress", "--tensorboard", "false"]
    assert main([*args, "--iterations", "2"]) == 0
    assert main([*args, "--iterations", "3", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 3
    assert (tmp_path / "out" / "curves.png").is_file() and (tmp_path / "out" / "value.safetensors").exists() is False
    assert promptist_main(["optimize", "--model", str(tmp_path / "out"), "--offline", "--max-new-tokens", "20",
                           "a cat"]) == 0
    assert main([*args, "--iterations", "3"]) == 2  # the folder holds a run: --resume or another folder
    assert main(["ppo", "--prompts", "p.txt", "--policy", "x", "--out", "o", "--print-config"]) == 0
    assert main(["ppo", "--prompts", str(sft_policy / "prompts.txt"), "--policy", str(sft_policy / "sft"),
                 "--out", str(tmp_path / "o2")]) == 2  # no reward given


def test_ppo_end_to_end_on_a_tiny_diffusers_pipeline_writes_a_policy_the_optimizer_loads(
        sft_policy, tiny_sd_dir, tiny_clip_models_dir, tmp_path):
    from promptist_core.generators import load_diffusers_generator
    from promptist_core.optimizer import load_optimizer
    from promptist_core.rewards import load_scorer

    generator = load_diffusers_generator(str(tiny_sd_dir), device="cpu")
    scorer = load_scorer("tiny-open-clip-hub", str(tiny_clip_models_dir / "tiny-head.safetensors"),
                         models_dir=tiny_clip_models_dir, device="cpu")
    reward = ImageReward(generator, scorer, images_per_prompt=2, steps=2, size=(64, 64))
    config = _config(sft_policy, tmp_path / "out", iterations=2, batch_size=2, num_beam_groups=2, save_every=1,
                     valid_count=2)
    train_ppo(config, reward, baseline_cache=reward.cache)
    row = _log(tmp_path / "out")[-1]
    assert row["reward_aes"] != "" and row["reward_rel"] != ""
    assert load_optimizer(str(tmp_path / "out"), device="cpu")("a cat", max_new_tokens=10)[0].prompt


def test_text_reward_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="module:function"):
        TextReward.from_spec("no_colon")
    with pytest.raises(ValueError, match="cannot load the text reward"):
        TextReward.from_spec("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="returned 1 rewards for 2 rewrites"):
        TextReward(lambda p, r: [1.0])(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="not a finite number"):
        TextReward(lambda p, r: [float("nan")])(["a"], ["a"])
    assert isinstance(TextReward(lambda p, r: [1] * len(r))(["a"], ["b"]), RewardBatch)
    assert BaselineCache.key("g", "a cat", 3) != BaselineCache.key("g", "a cat", 4)
    assert sys.modules.get("no_such_module_xyz") is None


PPO_WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from trainer.policy.ppo import PPOConfig, train_ppo
from trainer.policy.rewards import TextReward
from trainer.runtime import runtime_from_env
config = PPOConfig(**json.loads(sys.argv[1]))
runtime = runtime_from_env("cpu", "fp32")
result = train_ppo(config, TextReward.from_spec("ppo_reward:likes_fantasy"), runtime=runtime)
weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
save_file({"w": weights}, os.path.join(config.out, f"rank{runtime.rank}.safetensors"))
"""


def test_accelerate_launch_two_cpu_processes_ppo_leaves_identical_weights_on_both_ranks(sft_policy, tmp_path):
    import os
    import shutil
    import subprocess

    from conftest import ROOT

    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not installed")
    (tmp_path / "worker.py").write_text(PPO_WORKER)
    (tmp_path / "ppo_reward.py").write_text(
        "def likes_fantasy(plains, rewrites):\n    return [float('fantasy' in r) for r in rewrites]\n")
    config = {k: v for k, v in vars(_config(sft_policy, tmp_path / "ddp", iterations=2, batch_size=4,
                                            num_beam_groups=4, save_every=2)).items()}
    done = subprocess.run(
        [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
         str(tmp_path / "worker.py"), json.dumps(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
             "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))["w"]
    rank1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))["w"]
    assert torch.equal(rank0, rank1)
    assert [c.step for c in list_checkpoints(tmp_path / "ddp")] == [2]
    assert len(_log(tmp_path / "ddp")) == 2  # rank 0 logs the iterations, once each


def test_every_rollout_batch_is_full_across_epoch_boundaries():
    from trainer.policy.sft import micro_batches

    cursor = {"epoch": 0, "index": 0}
    stream = micro_batches([1] * 10, 4, 0, 1, cursor, drop_last=True)
    batches = [next(stream) for _ in range(6)]
    assert all(len(b) == 4 for b in batches) and cursor == {"epoch": 2, "index": 2}


def test_ppo_cli_on_a_tiny_diffusers_pipeline_runs_resumes_and_its_output_loads(sft_policy, tiny_sd_dir,
                                                                                tiny_clip_models_dir, tmp_path, capsys):
    from promptist_core.cli import main as promptist_main
    from trainer.cli import main

    args = ["ppo", "--prompts", str(sft_policy / "prompts.txt"), "--policy", str(sft_policy / "sft"),
            "--sd", str(tiny_sd_dir), "--clip-model", "tiny-open-clip-hub",
            "--aesthetic-head", str(tiny_clip_models_dir / "tiny-head.safetensors"),
            "--models-dir", str(tiny_clip_models_dir), "--image-steps", "2", "--width", "64", "--height", "64",
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--num-beam-groups", "2", "--max-new-tokens", "16",
            "--device", "cpu", "--no-progress", "--tensorboard", "false", "--valid-every", "1", "--valid-count", "2"]
    assert main([*args, "--iterations", "1"]) == 0
    assert main([*args, "--iterations", "2", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 2
    rows = _log(tmp_path / "out")
    assert [r["step"] for r in rows] == ["0", "1", "2"] and rows[-1]["reward_aes"] != ""
    assert rows[0]["reward"] == "" and all(r["valid_reward"] != "" for r in rows)  # 0: the SFT policy's baseline
    for step in (0, 1, 2):  # the tiny SD's validation grids, plain vs the policy, one per validation
        folder = tmp_path / "out" / "samples" / f"iter-{step:06d}"
        summary = json.loads((folder / "summary.json").read_text())
        assert (folder / "grid.png").is_file() and [v["name"] for v in summary["variants"]] == ["plain", "policy"]
        assert summary["settings"]["iteration"] == step and summary["settings"]["prompts"] == 2
    state = list_checkpoints(tmp_path / "out")[-1].state
    assert len(state["baseline_cache"]) == 2 * 2 * 2  # 2 iterations x 2 prompts x 2 images, kept across the resume
    assert promptist_main(["optimize", "--model", str(tmp_path / "out"), "--offline", "--max-new-tokens", "16",
                           "a cat"]) == 0


def test_ppo_from_the_bundled_policy_takes_its_decoding_unless_the_run_sets_it():
    from trainer.policy.ppo import policy_decoding

    config = PPOConfig(policy="promptist-mini")
    decoding = policy_decoding(config)
    assert (config.keep_prompt, config.no_repeat_ngram_size) == (True, 2) == (decoding.keep_prompt,
                                                                           decoding.no_repeat_ngram_size)
    config = PPOConfig(policy="promptist-mini", keep_prompt=False, no_repeat_ngram_size=0)
    assert policy_decoding(config).keep_prompt is False and config.no_repeat_ngram_size == 0
