"""`python -m kvlab` (also what `torchrun -m kvlab` starts)."""

import sys

from kvlab.cli import main

sys.exit(main())
