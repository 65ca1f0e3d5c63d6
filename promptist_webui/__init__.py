"""The AUTOMATIC1111 / Forge adapter: thin glue from the webui's objects to promptist_core and trainer.

- `host`: the webui's modules (the one place that imports `modules`), the extension's folders.
- `errors`: PromptistError, stopping a job with it (`stop_job`, `guarded`), the DF-Prompt check.
- `job_models`: every model a job needs, checked before it starts (all missing ones in one message).
- `lora_check`: a visible warning when a prompt's TPO LoRA does not fit the loaded checkpoint.
- `infotext`: the scripts' titles and infotext keys; PNG Info restores the user's prompt.
- `optimize`: the always-visible "Promptist" script and its processing hooks (rewrite, DF-Prompt render).
- `score`: the always-visible "Promptist score" script (scores into the infotext, best of N).
- `train`: WebuiGenerator (the webui's txt2img as an image generator) and the Train SFT / PPO runs.
- `tab`: the Promptist tab, its sections, and the settings page.

The webui loads `scripts/promptist.py`, which imports these and registers the scripts and callbacks.
Named `promptist_webui` so that it never collides with the webui's own `webui.py` or `modules`.
"""
