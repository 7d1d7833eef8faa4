"""When this package began importing: the start of a command's time budget (``nasfpn demo``).

Imported first by ``nasfpn/__init__.py``, so torch's import (seconds on a slow CPU) comes after it.
The process's own start time is not used: a shell script that ``exec``s the command (scripts/demo.sh,
after setting up its environment) keeps its start time.
"""

import time

STARTED = time.time()
