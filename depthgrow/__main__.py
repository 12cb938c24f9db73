import sys

from depthgrow.console import main

sys.exit(main())
