#!/usr/bin/env python
"""Runs mico_ds.cli.train_tokenizer (after pip install also the console script mico-train-tokenizer)."""

import sys

from mico_ds.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
