#!/usr/bin/env python
"""Runs mico_ds.cli.make_demo_data (after pip install also the console script mico-make-demo-data)."""

import sys

from mico_ds.cli.make_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
