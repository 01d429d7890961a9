import sys

from sagellm_core.cli import main

sys.exit(main())
