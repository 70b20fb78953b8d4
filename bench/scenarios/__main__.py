"""``python -m bench.scenarios``: see bench/scenarios/__init__.py."""

import sys

from bench.scenarios.cli import main

sys.exit(main())
