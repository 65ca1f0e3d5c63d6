"""Headless trainers (SFT, PPO) built on promptist_core. See README.md, "Training"."""
