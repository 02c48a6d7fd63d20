import sys

from tdpmmu.cli import main

sys.exit(main())
