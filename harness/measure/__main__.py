"""``python -m harness.measure``: see :mod:`harness.measure.command`."""

import sys

from harness.measure.command import main

sys.exit(main())
