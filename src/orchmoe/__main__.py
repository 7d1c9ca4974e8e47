"""``python -m orchmoe`` (and ``accelerate launch -m orchmoe``): the command line."""

import sys

from .recipe.cli import main

sys.exit(main())
