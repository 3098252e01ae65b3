"""One torch thread in the test process, as in the CLI subprocesses the tests start (tests/cli_runs.py).

On a 2-core machine that is busy with something else, torch's default of one intra-op thread per core makes
OpenMP threads wait on each other: a 5 s test was seen taking 170 s. One thread keeps every test's time
close to its CPU time on a busy machine and on a quiet one alike.
"""

import torch

torch.set_num_threads(1)
