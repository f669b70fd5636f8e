"""``python -m tinymrcnn ...`` runs the ``tinymrcnn`` command (see tinymrcnn/cli.py)."""

import sys

from .cli import main

sys.exit(main())
