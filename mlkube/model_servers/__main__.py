import sys

from mlkube.model_servers.entrypoint import main

sys.exit(main())
