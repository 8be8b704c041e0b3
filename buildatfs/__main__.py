import sys

from buildatfs.cli import main

sys.exit(main())
