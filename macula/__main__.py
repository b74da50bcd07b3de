"""``python -m macula`` is the ``macula`` command."""

import sys

from macula.cli import main

sys.exit(main())
