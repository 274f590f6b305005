import sys

from densa.cli import main

sys.exit(main())
