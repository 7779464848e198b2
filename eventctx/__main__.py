"""``python -m eventctx``: the command line."""

import sys

from eventctx.cli import main

sys.exit(main())
