#!/usr/bin/env python
"""Runs mico_ds.cli.to_universal (after pip install also the console script mico-to-universal)."""

import sys

from mico_ds.cli.to_universal import main

if __name__ == "__main__":
    sys.exit(main())
