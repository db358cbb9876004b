import sys

from memprop.cli import main

sys.exit(main())
