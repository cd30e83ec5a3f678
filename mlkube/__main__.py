import sys

from mlkube.cli import main

sys.exit(main())
