"""Prompt-policy training: corpus, pairs, SFT, PPO and its rewards (Promptist, PAE)."""
