import sys

from edgepix.cli import main

sys.exit(main())
