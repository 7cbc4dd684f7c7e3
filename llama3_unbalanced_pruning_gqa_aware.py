#!/usr/bin/env python
"""Compatibility entry point: the original research script's name, same flags as ``gqa-prune``.

    python llama3_unbalanced_pruning_gqa_aware.py --base_model ... --pruning_ratio 0.25 --prune_mlp
"""

import sys

from gqa_prune.cli import main

if __name__ == "__main__":
    sys.exit(main())
