"""``python -m stagewise`` is the ``stagewise`` command."""

import sys

from stagewise.cli.main import main

sys.exit(main())
