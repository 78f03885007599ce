"""``python -m demo`` (from the repository root): the same as ``ci/demo`` without the setup."""

import sys

from demo.run_demo import main

sys.exit(main())
