#!/usr/bin/env python
"""Runs mico_ds.cli.zero_to_fp32 (after pip install also the console script mico-zero-to-fp32)."""

import sys

from mico_ds.cli.zero_to_fp32 import main

if __name__ == "__main__":
    sys.exit(main())
