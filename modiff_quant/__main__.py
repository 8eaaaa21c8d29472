"""`python -m modiff_quant`: the command line, as torchrun launches it (`torchrun -m modiff_quant eval ...`)."""

import sys

from .cli import main

sys.exit(main())
