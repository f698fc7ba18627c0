from mico_ds.distributed.launch import exit_now
from mico_ds.planner.cli import main

exit_now(main())  # without the interpreter's teardown of live Gloo groups (distributed/launch.py)
