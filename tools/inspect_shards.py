#!/usr/bin/env python
"""Runs mico_ds.cli.inspect_shards (after pip install also the console script mico-inspect-shards)."""

import sys

from mico_ds.cli.inspect_shards import main

if __name__ == "__main__":
    sys.exit(main())
