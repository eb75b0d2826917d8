import sys

from tinyfleet.cli import main

sys.exit(main())
