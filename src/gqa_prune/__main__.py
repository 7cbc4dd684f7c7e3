import sys

from gqa_prune.cli import main

sys.exit(main())
