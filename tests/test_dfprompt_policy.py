"""DF-Prompt policy (PAE stage 2): one (weight, range) decision per modifier, read where the modifier
closes; files next to the LM; the optimizer's DF-Prompts round-trip through the grammar; stage 1 makes the
default classes most likely; stage 2 learns a rewarded weight and range with exact head log-probs."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from builders_lm import build_tiny_gpt2_base
from conftest import MODIFIERS, SUBJECTS

from promptist_core import dfprompt
from promptist_core.dfprompt_policy import (
    CONFIG_FILE,
    DEFAULT_RANGE,
    DEFAULT_WEIGHT,
    HEADS_FILE,
    DFHeads,
    Piece,
    compose,
    load_heads,
    pae_prior,
    split_response,
)

TRAIN_PROMPTS, HELD_OUT = SUBJECTS[:12], SUBJECTS[12:]


# --- the model's pieces -------------------------------------------------------------------------------

def test_pae_prior_is_68_percent_on_the_default_and_16_on_each_neighbour():
    weights, ranges = pae_prior(5, DEFAULT_WEIGHT), pae_prior(3, DEFAULT_RANGE)
    assert weights[2] == pytest.approx(0.6827, abs=1e-3) and weights[1] == weights[3] == pytest.approx(0.1573, abs=1e-3)
    assert ranges == pytest.approx([0.1587, 0.6827, 0.1587], abs=1e-3)
    assert sum(weights) == pytest.approx(1.0) and sum(ranges) == pytest.approx(1.0)


def test_a_response_splits_into_modifiers_closing_at_their_comma_or_the_eos(tiny_optimizer):
    tok = tiny_optimizer.tokenizer
    source = "a cat riding a bike"
    response = tok(" a cat riding a bike, highly detailed,, 8k", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = split_response(source, response, tok)
    assert [p.text for p in pieces] == ["a cat riding a bike", "highly detailed", "", "8k"]
    assert pieces[0].end is None and pieces[2].end is None  # an echo of the prompt and an empty piece: no decision
    commas = [i for i, t in enumerate(response) if "," in tok.decode([t])]
    assert pieces[1].end == commas[1] and pieces[3].end == len(response) - 1  # its own comma; the eos
    with pytest.raises(ValueError, match="eos"):
        split_response(source, response[:-1], tok)


def test_composed_dfprompts_keep_the_prompt_verbatim_and_round_trip_through_the_grammar():
    pieces = [Piece("a cat", None), Piece("anime", 3), Piece("detailed", 5), Piece("8k [hd]", 7)]
    out = compose("a cat, (cute:1.2)", pieces, {3: (4, 2), 5: (2, 1), 7: (0, 0)})
    assert out == "a cat, (cute:1.2), [anime:0.5-1:1.5], detailed, [8k \\[hd\\]:0-0.5:0.5]"
    assert dfprompt.format_prompt(dfprompt.parse(out)) == out
    segments = dfprompt.schedule(out, 10)
    assert [(s.first_step, s.last_step) for s in segments] == [(0, 4), (5, 9)]
    assert "anime" in segments[0].text and "anime" not in segments[1].text and "8k [hd]" in segments[1].text
    assert compose("a [broken prompt", [], {}) == "a \\[broken prompt"  # the grammar would reject it verbatim


def test_head_files_load_back_exactly_and_refuse_other_shapes(tmp_path):
    heads = DFHeads(16)
    from promptist_core.dfprompt_policy import save_heads

    save_heads(heads, tmp_path)
    again = load_heads(tmp_path)
    assert again.weights == dfprompt.PAE_WEIGHTS and again.ranges == dfprompt.PAE_RANGES
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), again.state_dict().values(), strict=True))
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["weights"] = [1.0, 2.0]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_heads(tmp_path)
    assert load_heads(tmp_path / "nothing") is None


def _tilt(heads: DFHeads, weight: int, range_: int) -> DFHeads:
    """Heads that choose (weight, range_) for every input: a bias-free head cannot, so add to its logits."""
    bonus_w = torch.zeros(len(heads.weights))
    bonus_w[weight] = 50.0
    bonus_r = torch.zeros(len(heads.ranges))
    bonus_r[range_] = 50.0
    original = heads.forward

    def forward(hidden):
        w, r = original(hidden)
        return w + bonus_w.to(w.device), r + bonus_r.to(r.device)

    heads.forward = forward
    return heads


def test_the_optimizer_of_a_folder_with_heads_prints_dfprompts_that_schedule(tiny_promptist_dir, tmp_path, capsys):
    from promptist_core.cli import main
    from promptist_core.optimizer import PromptOptimizer, load_optimizer
    from promptist_core.policy_folder import save_policy_folder
    from trainer.policy.sft import load_trainable_policy

    torch.manual_seed(0)  # the heads built below draw from the global RNG: the same draws whatever ran before
    lm, tokenizer = load_trainable_policy(str(tiny_promptist_dir / "tiny-promptist"))
    heads = DFHeads(lm.config.n_embd)
    g = torch.Generator().manual_seed(0)  # not the global RNG: the draw must not depend on the tests run before
    with torch.no_grad():  # a bias-free head cannot be forced to one class for every input: scale it instead
        heads.weight.weight.copy_(torch.randn(heads.weight.weight.shape, generator=g))
        heads.range.weight.copy_(torch.randn(heads.range.weight.shape, generator=g))
    folder = save_policy_folder(lm, tokenizer, tmp_path / "df-policy", dfprompt_heads=heads)
    assert (folder / HEADS_FILE).is_file() and (folder / CONFIG_FILE).is_file()

    optimizer = load_optimizer(str(folder), device="cpu")
    assert optimizer.is_dfprompt
    source = "a cat riding a bike"
    result = optimizer(source, max_new_tokens=30, num_beams=1)[0]
    assert result.dfprompt and result.prompt.startswith(source + ", ")
    parsed = dfprompt.parse(result.prompt)
    assert dfprompt.format_prompt(parsed) == result.prompt
    assert parsed.modifiers, result.prompt  # random heads of this scale rarely leave every modifier at (1.0, 0-1)
    assert all(m.weight in dfprompt.PAE_WEIGHTS and (m.start, m.end) in dfprompt.PAE_RANGES for m in parsed.modifiers)
    assert dfprompt.schedule(result.prompt, 20)
    # the same text through a plain optimizer, with the heads forced to (1.0, 0-1): plain modifiers only
    plain = PromptOptimizer(optimizer.model, optimizer.tokenizer)(source, max_new_tokens=30, num_beams=1)[0]
    forced = PromptOptimizer(optimizer.model, optimizer.tokenizer,
                             dfprompt_heads=_tilt(DFHeads(lm.config.n_embd), DEFAULT_WEIGHT, DEFAULT_RANGE))
    expected = ", ".join([source] + [p.strip() for p in plain.prompt.split(",") if p.strip() and p.strip() not in source])
    assert forced(source, max_new_tokens=30, num_beams=1)[0].prompt == expected
    soft = PromptOptimizer(optimizer.model, optimizer.tokenizer, dfprompt_heads=DFHeads(lm.config.n_embd))  # ~uniform
    sampled = [soft(source, max_new_tokens=30, num_beams=1, head_choice="sample", seed=s)[0].prompt for s in range(4)]
    assert len(set(sampled)) > 1
    assert soft(source, max_new_tokens=30, num_beams=1, head_choice="sample", seed=1)[0].prompt == sampled[1]

    # the CLI: optimize prints the DF-Prompt; dfprompt schedules it; --render a1111 gives the host's form
    assert main(["optimize", "--model", str(folder), "--offline", "--device", "cpu", "--max-new-tokens", "30", "--num-beams", "1",
                 source]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == result.prompt
    assert main(["dfprompt", printed, "--steps", "20"]) == 0
    assert capsys.readouterr().out.startswith("steps 0-")
    assert main(["optimize", "--model", str(folder), "--offline", "--device", "cpu", "--max-new-tokens", "30", "--num-beams", "1",
                 "--render", "a1111", "--steps", "20", source]) == 0
    assert capsys.readouterr().out.strip() == dfprompt.to_a1111(result.prompt, 20)


# --- stage 1: SFT plus the heads' prior -----------------------------------------------------------------

def head_stats(folder: Path, prompts) -> dict:
    """At the modifier ends of each prompt's greedy rewrite: mean probability of every class, and how often
    each class is the heads' choice (argmax), for weight and range."""
    from promptist_core.dfprompt_policy import split_response
    from promptist_core.optimizer import REPHRASE_SUFFIX, load_optimizer

    optimizer = load_optimizer(str(folder), device="cpu")
    tok, heads = optimizer.tokenizer, optimizer.dfprompt_heads
    probs_w, probs_r = [], []
    for prompt, result in zip(prompts, optimizer(list(prompts), num_beams=1, max_new_tokens=30), strict=True):
        text = result.candidates[0]
        prompt_ids = tok(prompt + REPHRASE_SUFFIX, add_special_tokens=False)["input_ids"]
        plain = dfprompt.to_plain(text)  # the modifiers' text, in order
        response = tok(" " + plain[len(prompt):].lstrip(", "), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ends = [p.end for p in split_response(prompt, response, tok) if p.end is not None]
        with torch.no_grad():
            hidden = optimizer.model.base_model(input_ids=torch.tensor([prompt_ids + response]))[0][0]
            w, r = heads(hidden[[len(prompt_ids) - 1 + e for e in ends]])
        probs_w.append(w.softmax(-1))
        probs_r.append(r.softmax(-1))
    w, r = torch.cat(probs_w), torch.cat(probs_r)
    return {"decisions": len(w), "p_weight": w.mean(0).tolist(), "p_range": r.mean(0).tolist(),
            "argmax_weight": torch.bincount(w.argmax(-1), minlength=5).div(len(w)).tolist(),
            "argmax_range": torch.bincount(r.argmax(-1), minlength=3).div(len(r)).tolist()}


@pytest.fixture(scope="module")
def df_sft(tmp_path_factory) -> Path:
    """A tiny SFT policy with heads trained toward PAE's prior (stage 1), and a prompt file for stage 2."""
    from trainer.policy.sft import SFTConfig, train_sft

    root = tmp_path_factory.mktemp("dfpolicy")
    rng = random.Random(0)
    pairs = []
    for subject in SUBJECTS:
        for _ in range(20):
            mods = rng.sample(MODIFIERS, rng.randint(2, 4))
            pairs.append({"source": subject, "target": subject + ", " + ", ".join(mods), "split": "train"})
    base = build_tiny_gpt2_base(root / "base", [p["target"] for p in pairs])
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    result = train_sft(SFTConfig(pairs=str(root / "pairs.jsonl"), base=str(base), out=str(root / "sft"),
                                 max_steps=200, batch_size=16, effective_batch_size=16, lr=3e-3, warmup_steps=10,
                                 save_every=100, eval_every=0, tensorboard=False, select="last", dfprompt_heads=True))
    assert result.dfprompt_heads is not None
    (root / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    return root


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_stage_1_makes_the_default_weight_and_range_the_heads_choice_and_saves_them_everywhere(df_sft):
    folder = df_sft / "sft"
    stats = head_stats(folder, HELD_OUT)
    assert stats["decisions"] >= 2 * len(HELD_OUT)
    assert stats["argmax_weight"][DEFAULT_WEIGHT] == 1.0 and stats["argmax_range"][DEFAULT_RANGE] == 1.0, stats
    assert stats["p_weight"][DEFAULT_WEIGHT] > 0.5 and stats["p_range"][DEFAULT_RANGE] > 0.5, stats
    rows = _log(folder)
    assert float(rows[-1]["head_loss"]) < float(rows[0]["head_loss"])
    from trainer.checkpoint import list_checkpoints

    for where in (folder, folder / "last", list_checkpoints(folder)[-1].folder):
        assert load_heads(where) is not None, where
    # at the default classes the optimizer's DF-Prompt is plain text
    from promptist_core.optimizer import load_optimizer

    text = load_optimizer(str(folder), device="cpu")(HELD_OUT[0], num_beams=1, max_new_tokens=30)[0].prompt
    assert not dfprompt.parse(text).modifiers and text.startswith(HELD_OUT[0])


# --- stage 2: PPO over the joint action ---------------------------------------------------------------

def test_the_ratio_uses_the_log_prob_of_the_sampled_class_at_each_modifier_end(df_sft):
    """PAE's code took the log-prob of the fixed classes (2, 1) at every position: this fails on it."""
    from trainer.policy.ppo import head_logprobs, sample_modifiers
    from trainer.policy.sft import load_trainable_policy

    _, tokenizer = load_trainable_policy(str(df_sft / "sft"))
    eos = tokenizer.eos_token_id
    plains = ["a cat", "a dog"]
    responses = [tokenizer(" a cat, sharp focus, 8k", add_special_tokens=False)["input_ids"] + [eos],
                 tokenizer(" smooth", add_special_tokens=False)["input_ids"] + [eos]]
    length = max(map(len, responses))
    torch.manual_seed(0)
    w_logits, r_logits = torch.randn(2, length, 5), torch.randn(2, length, 3)
    heads = DFHeads(8)
    acts = sample_modifiers(plains, responses, tokenizer, heads, w_logits, r_logits, torch.Generator().manual_seed(3))
    assert acts.decisions.sum().item() == 3  # "sharp focus", "8k", "smooth": not the echo "a cat"
    got_w = head_logprobs(w_logits, acts.weights, acts.decisions)
    got_r = head_logprobs(r_logits, acts.ranges, acts.decisions)
    pae_w = torch.log_softmax(w_logits, -1)[..., DEFAULT_WEIGHT] * acts.decisions
    for row, col in acts.decisions.nonzero().tolist():
        assert got_w[row, col] == torch.log_softmax(w_logits[row, col], -1)[acts.weights[row, col]]
        assert got_r[row, col] == torch.log_softmax(r_logits[row, col], -1)[acts.ranges[row, col]]
    assert not torch.allclose(got_w, pae_w)  # some sampled class differs from the default here
    assert torch.equal(got_w * (1 - acts.decisions), torch.zeros_like(got_w))  # no decision, no log-prob
    for text in acts.dfprompts:  # what the reward sees: the prompt verbatim, then modifiers
        assert dfprompt.format_prompt(text) == text and text.split(",")[0] in plains


def dfprompt_reward(plains, rewrites):
    """Prefers weight 1.5 and range 0.5-1 for every modifier: -|w - 1.5| - [range != 0.5-1], averaged. It
    parses the DF-Prompt it is given; a plain modifier is (1.0, 0-1); no modifier at all scores worst."""
    scores = []
    for plain, text in zip(plains, rewrites, strict=True):
        parsed = dfprompt.parse(text)
        rest = "".join(p for p in parsed.parts if isinstance(p, str))[len(plain):]
        mods = [(m.weight, (m.start, m.end)) for m in parsed.modifiers]
        mods += [(1.0, (0.0, 1.0)) for piece in rest.split(",") if piece.strip()]
        per = [-abs(w - 1.5) - float(r != (0.5, 1.0)) for w, r in mods]
        scores.append(sum(per) / len(per) if per else -2.0)
    return scores


def test_a_heads_advantage_is_its_rewrites_score_against_the_others_never_the_token_kl():
    """The weight and range choices change only the DF-Prompt the reward sees, so their credit is the score
    (leave-one-out or batch baseline, whitened): the token KL penalty, often far larger, once drowned it."""
    from trainer.policy.ppo import head_advantages

    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 9.0])
    rloo = head_advantages(scores, 4)
    assert rloo[0] > 0 and rloo[1] == rloo[2] == rloo[3] < 0 and rloo[7] > 0 and rloo[4] == rloo[5] == rloo[6] < 0
    assert rloo.mean().abs() < 1e-6 and rloo.std() == pytest.approx(1.0, abs=1e-5)
    batch = head_advantages(scores, 1)
    assert torch.allclose(batch, (scores - scores.mean()) / scores.std(), atol=1e-5)


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_ppo_learns_the_rewarded_weight_and_range_while_a_large_token_beta_holds_the_text(df_sft, tmp_path, advantage):
    from trainer.policy.ppo import PPOConfig, train_ppo
    from trainer.policy.rewards import TextReward

    before = head_stats(df_sft / "sft", HELD_OUT)
    k = 4 if advantage == "rloo" else 1
    config = PPOConfig(prompts=str(df_sft / "prompts.txt"), policy=str(df_sft / "sft"), out=str(tmp_path / "df"),
                       dfprompt=True, iterations=30, batch_size=4 if k > 1 else 8, advantage=advantage, rloo_samples=max(k, 2),
                       num_beam_groups=8, min_new_tokens=10, max_new_tokens=30, lr=2e-4, head_lr=5e-3,
                       trainable_top_blocks=0, beta=10.0, save_every=30, sample_every=5, tensorboard=False)
    result = train_ppo(config, TextReward(dfprompt_reward))
    after = head_stats(result.out, HELD_OUT)
    rows = _log(tmp_path / "df")
    # the stage-1 prior never chooses them (1.5 has 0.1% there)...
    assert before["argmax_weight"][4] == 0.0 and before["argmax_range"][2] == 0.0 and before["p_weight"][4] < 0.01
    # ...and after stage 2 both heads choose the rewarded class at the modifier ends of held-out prompts
    assert after["argmax_weight"][4] > 0.8 and after["argmax_range"][2] > 0.8, after
    assert after["p_weight"][4] > 0.6 and after["p_range"][2] > 0.6, after
    assert float(rows[-1]["mean_weight"]) > 1.3, [r["mean_weight"] for r in rows]
    rewards = [float(r["reward"]) for r in rows]
    assert sum(rewards[-5:]) / 5 > rewards[0] + 0.6, rewards
    kls = [float(r["kl"]) for r in rows]
    assert sum(kls) / len(kls) < 2.0, kls  # beta 10: the tokens stay near the reference (~1 nat per rewrite)
    assert float(rows[-1]["kl_weight"]) > 0.1 and float(rows[0]["kl_weight"]) == 0.0
    # what it writes: DF-Prompts the grammar and the scheduler read, with the learned blocks
    from promptist_core.optimizer import load_optimizer

    text = load_optimizer(str(result.out), device="cpu")(HELD_OUT[0], num_beams=1, max_new_tokens=30)[0].prompt
    assert text.startswith(HELD_OUT[0] + ", ") and dfprompt.format_prompt(text) == text
    modifiers = dfprompt.parse(text).modifiers
    assert modifiers and all((m.weight, m.start, m.end) == (1.5, 0.5, 1.0) for m in modifiers), text
    assert [s.first_step for s in dfprompt.schedule(text, 20)] == [0, 10]
    samples = [json.loads(line) for line in (tmp_path / "df" / "samples.jsonl").read_text().splitlines()]
    assert all(dfprompt.format_prompt(s["rewrite"]) == s["rewrite"] for s in samples)


def test_each_heads_kl_to_the_reference_is_a_loss_that_holds_it_there(df_sft, tmp_path):
    """With a reward that never varies, only the entropy bonus moves the heads (toward flatter choices); a
    large beta_weight keeps the weight head at the reference, beta_range 0 lets the range head go. (As a
    reward term the exact KL would not depend on the class drawn and could not hold a head back.)"""
    from trainer.policy.ppo import PPOConfig, train_ppo
    from trainer.policy.rewards import TextReward

    config = PPOConfig(prompts=str(df_sft / "prompts.txt"), policy=str(df_sft / "sft"), out=str(tmp_path / "kl"),
                       dfprompt=True, iterations=8, batch_size=2, advantage="rloo", rloo_samples=2, num_beam_groups=4,
                       min_new_tokens=10, max_new_tokens=20, head_lr=5e-3, head_entropy=0.5, beta_weight=5.0,
                       beta_range=0.0, trainable_top_blocks=1, save_every=8, tensorboard=False)
    train_ppo(config, TextReward(lambda plains, rewrites: [0.0] * len(rewrites)))
    rows = _log(tmp_path / "kl")
    per_decision = [(float(r["kl_weight"]) / float(r["modifiers"]), float(r["kl_range"]) / float(r["modifiers"]))
                    for r in rows]
    assert per_decision[0] == (0.0, 0.0)
    assert per_decision[-1][1] > 0.1 and per_decision[-1][0] < per_decision[-1][1] / 5, per_decision


# --- resume and end to end ----------------------------------------------------------------------------

def test_a_stopped_dfprompt_run_resumes_to_the_same_lm_heads_value_and_log(df_sft, tmp_path):
    from safetensors.torch import load_file

    from trainer.checkpoint import list_checkpoints
    from trainer.policy.ppo import PPOConfig, train_ppo
    from trainer.policy.rewards import TextReward
    from trainer.progress import StopTraining

    def config(out):  # gae: the value model resumes too; minibatches: the heads' optimizer state matters
        return PPOConfig(prompts=str(df_sft / "prompts.txt"), policy=str(df_sft / "sft"), out=str(out), dfprompt=True,
                         iterations=4, batch_size=4, minibatch_size=2, num_beam_groups=4, min_new_tokens=10,
                         max_new_tokens=20, head_lr=5e-3, trainable_top_blocks=1, save_every=2, tensorboard=False)

    train_ppo(config(tmp_path / "full"), TextReward(dfprompt_reward))

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise StopTraining("test")

    with pytest.raises(StopTraining):
        train_ppo(config(tmp_path / "stopped"), TextReward(dfprompt_reward), callback=stop_at_3)
    train_ppo(config(tmp_path / "stopped"), TextReward(dfprompt_reward), resume=True)
    full, stopped = list_checkpoints(tmp_path / "full")[-1].folder, list_checkpoints(tmp_path / "stopped")[-1].folder
    for name in ("model.safetensors", "value.safetensors", HEADS_FILE):
        a, b = load_file(str(full / name)), load_file(str(stopped / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    heads_before = load_file(str(df_sft / "sft" / HEADS_FILE))
    assert not torch.equal(heads_before["weight.weight"], load_file(str(full / HEADS_FILE))["weight.weight"])
    assert _log(tmp_path / "full") == _log(tmp_path / "stopped")


def test_ppo_dfprompt_cli_on_a_tiny_diffusers_pipeline_writes_a_policy_whose_dfprompts_schedule(
        df_sft, tiny_sd_dir, tiny_clip_models_dir, tmp_path, capsys):
    """`python -m trainer ppo --dfprompt` renders the DF-Prompts with the diffusers pipeline and scores them with
    the pae preset; the trained folder makes `optimize` print DF-Prompts that `dfprompt` schedules."""
    from promptist_core.cli import main as promptist_main
    from trainer.checkpoint import list_checkpoints
    from trainer.cli import main

    args = ["ppo", "--dfprompt", "--prompts", str(df_sft / "prompts.txt"), "--policy", str(df_sft / "sft"),
            "--sd", str(tiny_sd_dir), "--clip-model", "tiny-open-clip-hub", "--pick-model", "tiny-pick",
            "--aesthetic-head", str(tiny_clip_models_dir / "tiny-head.safetensors"),
            "--models-dir", str(tiny_clip_models_dir), "--image-steps", "2", "--width", "64", "--height", "64",
            "--images-per-prompt", "1", "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--num-beam-groups", "2", "--max-new-tokens", "16", "--sample-every", "1", "--device", "cpu",
            "--no-progress", "--tensorboard", "false", "--valid-count", "2"]
    assert main([*args, "--iterations", "1"]) == 0
    assert main([*args, "--iterations", "2", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 2
    rows = _log(tmp_path / "out")
    assert [r["step"] for r in rows] == ["0", "1", "2"]  # 0: the validation of the SFT policy alone
    assert all(r["reward_pick"] != "" and r["modifiers"] != "" for r in rows[1:])  # the pae preset: PickScore too
    assert [r["valid_reward"] != "" for r in rows] == [True, True, True]  # at 0, resumed at 1 (its end), at 2
    summary = json.loads((tmp_path / "out" / "samples" / "iter-000002" / "summary.json").read_text())
    assert summary["metric"] == "total_pae"  # validation scores with the run's preset, PickScore included
    assert all(dfprompt.format_prompt(r) == r for r in summary["variants"][1]["rewrites"])  # the policy's DF-Prompts
    assert list_checkpoints(tmp_path / "out")[-1].state["config"]["dfprompt"] is True
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(dfprompt.format_prompt(s["rewrite"]) == s["rewrite"] for s in samples)
    assert load_heads(tmp_path / "out") is not None

    for seed in range(8):  # sampled heads: some modifier gets a block (the argmax after 2 iterations is the default)
        assert promptist_main(["optimize", "--model", str(tmp_path / "out"), "--offline", "--device", "cpu",
                               "--max-new-tokens", "16", "--num-beams", "1", "--head-choice", "sample",
                               "--seed", str(seed), HELD_OUT[0]]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed.startswith(HELD_OUT[0]) and dfprompt.format_prompt(printed) == printed
        if dfprompt.parse(printed).modifiers:
            break
    assert dfprompt.parse(printed).modifiers, printed
    assert promptist_main(["dfprompt", printed, "--steps", "20"]) == 0
    schedule = capsys.readouterr().out
    assert schedule.startswith("steps 0-") and schedule.count("steps ") == len(dfprompt.schedule(printed, 20))
