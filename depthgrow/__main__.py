import sys

from depthgrow.cli import main

sys.exit(main())
