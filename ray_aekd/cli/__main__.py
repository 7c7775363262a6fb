"""``python -m ray_aekd.cli`` runs the ``ray-aekd`` command."""

import sys

from ray_aekd.cli.main import main

sys.exit(main())
