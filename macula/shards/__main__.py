"""``python -m macula.shards ENDPOINT INDEX EPOCH MAX_BATCH``: run one delivery shard."""

from __future__ import annotations

import sys

from macula.shards.worker import main

sys.exit(main())
