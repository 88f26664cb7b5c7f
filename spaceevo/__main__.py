"""``python -m spaceevo`` runs the command-line interface."""

import sys

from spaceevo.cli import main

sys.exit(main())
