"""``python -m idgen ...`` runs the ``idgen`` command line."""

import sys

from idgen.cli import main

sys.exit(main())
