"""``python -m rise.stack up|status|down``: the local stack's command line (rise.stack.cli)."""

import sys

from rise.stack.cli import main

sys.exit(main())
