#!/usr/bin/env python
"""Runs mico_ds.cli.index_shards (after pip install also the console script mico-index-shards)."""

import sys

from mico_ds.cli.index_shards import main

if __name__ == "__main__":
    sys.exit(main())
