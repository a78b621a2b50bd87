"""python -m npvae: the command line (see npvae.cli)."""
import sys

from .cli import main

sys.exit(main())
