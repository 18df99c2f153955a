"""``python -m encouraging_loss.tools.results``: the ``el-results`` command line."""
import sys

from .cli import main

sys.exit(main())
