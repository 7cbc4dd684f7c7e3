"""``python -m gqa_prune.recovery`` (also under ``accelerate launch -m gqa_prune.recovery``)."""

import sys

from gqa_prune.recovery.cli import main

sys.exit(main())
