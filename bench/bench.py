#!/usr/bin/env python3
"""fastadam against its peers: see fastadam/benchmark.py (also `python -m fastadam --bench`)."""

import sys

from fastadam.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
