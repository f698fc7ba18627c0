#!/usr/bin/env python
"""Runs mico_ds.cli.split_subsets (after pip install also the console script mico-split-subsets)."""

import sys

from mico_ds.cli.split_subsets import main

if __name__ == "__main__":
    sys.exit(main())
