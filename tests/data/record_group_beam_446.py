"""Record golden outputs of transformers 4.46 group (diverse) beam search for tests/test_diverse_beam.py.

Run in a transformers==4.46.3 environment; not part of the test suite. Example:

    python -m venv /tmp/tf446 && /tmp/tf446/bin/pip install torch==2.14.1 transformers==4.46.3
    /tmp/tf446/bin/python tests/data/record_group_beam_446.py --build

`--build` (re)creates the tiny GPT-2 in tests/data/tiny_gpt2_golden/ from a fixed seed: random weights with
a wide init so the next-token distribution is peaked (few near-ties), plus an EOS output row aligned with
ln_f's bias so that EOS lands in the top ranks often and beams really finish early. Without `--build` the
committed model is reused, so re-recording does not silently change the weights.
The script then runs `model.generate(...)` for each case below and writes tests/data/group_beam_446.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny_gpt2_golden"
OUT_JSON = HERE / "group_beam_446.json"

VOCAB_SIZE = 512
EOS = 7  # also the pad id, as in Promptist (GPT-2 pad = eos)
SEED = 1234
INIT_STD = 0.3  # wide init: peaked distributions, so float noise between versions cannot flip a choice
EOS_BOOST = 1.15  # ~7% of positions have EOS as the top token, ~50% in the top 4

def case(name: str, lengths: list[int], prompt_seed: int, *, beams: int, groups: int, penalty: float,
         new: int, ret: int, lp: float, early_stopping: bool = False) -> tuple[str, list[int], int, dict]:
    """One recording: prompts of `lengths` (left padded to the longest), drawn with `prompt_seed`."""
    return name, lengths, prompt_seed, dict(
        num_beams=beams, num_beam_groups=groups, diversity_penalty=penalty, max_new_tokens=new,
        num_return_sequences=ret, length_penalty=lp, early_stopping=early_stopping)


CASES = [
    # Promptist's PPO rollouts: 16 groups x 1 beam, penalty 1.0, max_new_tokens drawn from [15, 75]
    case("promptist_rl_16x1_new15", [9], 100, beams=16, groups=16, penalty=1.0, new=15, ret=16, lp=1.0),
    case("promptist_rl_16x1_new75_batch2", [11, 6], 101, beams=16, groups=16, penalty=1.0, new=75, ret=16,
         lp=1.0),
    # what users pick: 8 beams in 4 groups, 4 groups x 1 beam, other splits; all three length penalties
    case("groups_8in4_lp_neg1_batch3", [12, 7, 3], 102, beams=8, groups=4, penalty=1.0, new=15, ret=8, lp=-1.0),
    case("groups_4x1_lp0_new5", [8], 103, beams=4, groups=4, penalty=1.0, new=5, ret=4, lp=0.0),
    case("groups_8in4_lp1_new30_batch2", [10, 4], 104, beams=8, groups=4, penalty=2.0, new=30, ret=3, lp=1.0),
    case("groups_6in2_penalty07_batch3", [5, 12, 9], 105, beams=6, groups=2, penalty=0.7, new=30, ret=6,
         lp=-1.0),
    case("groups_8in4_early_stopping", [10, 6], 106, beams=8, groups=4, penalty=1.0, new=30, ret=4, lp=1.0,
         early_stopping=True),
    case("groups_4x1_lp_neg1_batch3_new30", [3, 12, 8], 107, beams=4, groups=4, penalty=1.0, new=30, ret=2,
         lp=-1.0),
    case("groups_4x1_lp0_new60_batch3", [6, 12, 2], 108, beams=4, groups=4, penalty=1.0, new=60, ret=4, lp=0.0),
    case("groups_4in2_lp_neg1_new60", [7, 3], 109, beams=4, groups=2, penalty=0.5, new=60, ret=4, lp=-1.0),
    # prompts (seed 500) for which every (prompt, group) pair is done before max_new_tokens: the loop ends early
    case("groups_6in3_lp0_all_done_early", [5, 9], 500, beams=6, groups=3, penalty=0.2, new=60, ret=6, lp=0.0),
    case("groups_8in4_lp_neg1_all_done_early", [5, 9], 500, beams=8, groups=4, penalty=0.1, new=60, ret=8,
         lp=-1.0),
    # one group: 4.46 routes these to `_beam_search` with the same BeamSearchScorer
    case("plain_beam_4_batch3", [12, 7, 3], 110, beams=4, groups=1, penalty=0.0, new=15, ret=4, lp=1.0),
    case("plain_beam_3_lp0_new60", [4, 9], 111, beams=3, groups=1, penalty=0.0, new=60, ret=2, lp=0.0),
    # transformers 5's beam search returns other candidates here for prompt 3 (see the tests)
    case("plain_beam_8_lp1_batch3_eos_best_candidate", [4, 9, 2], 900, beams=8, groups=1, penalty=0.0, new=40,
         ret=8, lp=1.0),
    # the reference Promptist inference recipe (all candidates finish early with length_penalty -1)
    case("plain_beam_8_promptist_recipe", [9], 112, beams=8, groups=1, penalty=0.0, new=75, ret=8, lp=-1.0),
]


def build_model() -> None:
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS, initializer_range=INIT_STD)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.normal_(0.0, 1.0)
        direction = model.transformer.ln_f.bias / model.transformer.ln_f.bias.norm()
        model.transformer.wte.weight[EOS] = EOS_BOOST * direction  # lm_head is tied to wte
    model.save_pretrained(MODEL_DIR, safe_serialization=True)


def left_padded_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), EOS, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(10, VOCAB_SIZE, (length,), generator=gen)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


class DoneProbe:
    """Wraps BeamSearchScorer.finalize to see how many steps ran and which (item, group) pairs were done."""

    def __init__(self) -> None:
        self.steps = 0
        self.done: list[bool] = []
        self._original = transformers.generation.beam_search.BeamSearchScorer.finalize
        probe = self

        def finalize(scorer, input_ids, *args, decoder_prompt_len=0, **kwargs):
            probe.steps = input_ids.shape[-1] - decoder_prompt_len
            probe.done = scorer._done.tolist()
            return probe._original(scorer, input_ids, *args, decoder_prompt_len=decoder_prompt_len, **kwargs)

        transformers.generation.beam_search.BeamSearchScorer.finalize = finalize


def _one_line(match: re.Match) -> str:
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="rebuild the tiny model folder first")
    args = parser.parse_args()
    if args.build or not (MODEL_DIR / "model.safetensors").exists():
        build_model()

    model = GPT2LMHeadModel.from_pretrained(MODEL_DIR).eval()
    probe = DoneProbe()
    cases = []
    for name, lengths, prompt_seed, kwargs in CASES:
        input_ids, attention_mask = left_padded_prompts(lengths, seed=prompt_seed)
        gen_kwargs = dict(kwargs)
        if gen_kwargs["diversity_penalty"] == 0.0:
            del gen_kwargs["diversity_penalty"]  # 4.46 rejects a Hamming processor with one group
        out = model.generate(input_ids.clone(), attention_mask=attention_mask, do_sample=False,
                             eos_token_id=EOS, pad_token_id=EOS, output_scores=True,
                             return_dict_in_generate=True, **gen_kwargs)
        sequences = out.sequences
        generated = sequences[:, input_ids.shape[1]:]
        # a returned candidate finished early when an EOS sits inside its generated part before max length
        n_finished = int((generated == EOS).any(-1).sum())
        print(f"{name}: sequences {tuple(sequences.shape)}, {n_finished}/{len(sequences)} returned "
              f"candidates ended with EOS, {probe.steps}/{kwargs['max_new_tokens']} steps, "
              f"{sum(probe.done)}/{len(probe.done)} (item, group) pairs done by the heuristic")
        cases.append({
            "name": name,
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "prompt_seed": prompt_seed,
            "kwargs": kwargs,
            "sequences": sequences.tolist(),
            "sequence_scores": out.sequences_scores.tolist(),
            "returned_finished_with_eos": n_finished,
            "steps_run": probe.steps,
            "groups_done_by_heuristic": sum(probe.done),
        })

    text = json.dumps({
        "recorded_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "model_dir": MODEL_DIR.name,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "cases": cases,
    }, indent=1)
    # one line per token row / score list keeps the file short and its diffs readable
    text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", _one_line, text)
    OUT_JSON.write_text(text + "\n")
    print(f"wrote {OUT_JSON}")


if __name__ == "__main__":
    main()
