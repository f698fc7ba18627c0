#!/usr/bin/env python
"""Runs mico_ds.cli.fuzz_decoders: fuzzes the sample decoders (docs/operations.md, "Bounded decoding
and fuzzing")."""

import sys

from mico_ds.cli.fuzz_decoders import main

if __name__ == "__main__":
    sys.exit(main())
