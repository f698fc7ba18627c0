import sys

from mico_ds.planner.cli import main

sys.exit(main())
