"""``python -m sglang_elastic.cli``: the same as the ``sglang-elastic`` command."""
import sys

from . import main

sys.exit(main())
