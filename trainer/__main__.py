"""`python -m trainer <command>`: pairs, sft (see README.md, "Training")."""

import sys
from pathlib import Path

import promptist_core

promptist_core.check_own_packages(Path(__file__).resolve().parents[1])

from trainer.cli import main  # noqa: E402

sys.exit(main())
