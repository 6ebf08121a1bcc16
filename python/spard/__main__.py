import os
import sys

from spard.cli import main
from spard.distributed import launched_distributed

code = main()
if launched_distributed():
    # A rank started by torchrun / accelerate has written its outputs and closed its process
    # group; skip the interpreter's teardown, where backend threads of the collective library can
    # abort the process ("terminate called without an active exception") after a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
