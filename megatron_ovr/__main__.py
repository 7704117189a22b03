import sys

from megatron_ovr.cli import main

sys.exit(main())
