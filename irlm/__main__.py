import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ:
    # One rank of a launch (torchrun, env://): the engine is closed and its process group
    # destroyed by now.  Skip the interpreter's teardown, as spawned workers do: c10d's
    # background threads (store client, gloo) can abort the process ("terminate called
    # without an active exception") when they are destroyed there, turning a finished run
    # into a failed launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
