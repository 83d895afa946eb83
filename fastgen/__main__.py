"""``python -m fastgen`` (and ``accelerate launch -m fastgen``) runs the CLI."""

from fastgen.cli import entry

entry()
