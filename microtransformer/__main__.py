"""`python -m microtransformer ...` is the same as the `microtransformer` console script."""

import sys

from microtransformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
