"""`python -m training {fit,export,pretrained}`: a thin command line over the training library."""

from __future__ import annotations

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
