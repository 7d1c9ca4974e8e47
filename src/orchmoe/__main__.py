"""``python -m orchmoe`` (and ``accelerate launch -m orchmoe``): the command line."""

import sys

from orchmoe.cli import main

sys.exit(main())
