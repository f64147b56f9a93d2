import sys

from radpilot.cli import main

sys.exit(main())
