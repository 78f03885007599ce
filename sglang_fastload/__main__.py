"""``python -m sglang_fastload``."""

import sys

from sglang_fastload.cli import main

sys.exit(main())
