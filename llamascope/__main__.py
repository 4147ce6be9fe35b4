import sys

from llamascope.cli import main

sys.exit(main())
