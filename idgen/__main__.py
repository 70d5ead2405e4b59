"""``python -m idgen ...`` runs the ``idgen`` command line."""

import sys

from idgen.apps.cli import main

sys.exit(main())
