import sys

from gasungbi.cli import main

sys.exit(main())
