"""`python -m orchmoe ...` (also what `accelerate launch -m orchmoe train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
