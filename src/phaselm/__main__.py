"""``python -m phaselm ...`` (and ``torchrun -m phaselm train ...``): the ``phaselm`` command."""

import sys

from phaselm_cli import main

sys.exit(main())
