"""Headless trainers built on promptist_core, in two rooms over one infrastructure.

- `policy/`: prompt policies (Promptist, PAE): corpus, pairs, SFT, PPO and its image rewards.
- `tpo/`: the diffusion model (TPO: TDPO/TKTO LoRA): data, caption edits, denoiser, LoRA, train, evaluate.
- At the top, what both use: config, runtime, checkpoint, progress, training_log, training_run (the
  run-folder rules the hosts follow) and cli (`python -m trainer ...`).

See docs/training.md.
"""
