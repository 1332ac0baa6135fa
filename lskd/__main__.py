"""``python -m lskd ...`` (and ``torchrun -m lskd train ...``): the ``lskd`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
