#!/usr/bin/env python
"""Runs the planner, mico_ds.planner (also python -m mico_ds.planner, and mico-plan after pip install)."""

import sys

from mico_ds.planner import main

if __name__ == "__main__":
    sys.exit(main())
