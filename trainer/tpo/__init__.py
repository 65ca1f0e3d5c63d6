"""TPO: the diffusion model trained on (image, caption, edited caption) pairs: data, caption edits, denoiser, LoRA, train, evaluate."""
