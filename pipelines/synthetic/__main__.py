"""`python -m pipelines.synthetic`: see `pipelines.synthetic.cli`."""

import sys

from pipelines.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
