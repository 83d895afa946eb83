"""``python -m fastgen`` (and ``accelerate launch -m fastgen``) runs the CLI."""

import sys

from fastgen.cli import main

sys.exit(main())
