"""`python -m trainer <command>`: pairs, sft, ppo, tpo, tpo-data, tpo-eval (see docs/training.md)."""

import sys
from pathlib import Path

import promptist_core

promptist_core.check_own_packages(Path(__file__).resolve().parents[1])

from trainer.cli import main  # noqa: E402

sys.exit(main())
