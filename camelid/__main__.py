import sys

from camelid.cli import main

sys.exit(main())
