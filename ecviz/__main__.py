import sys

from ecviz.cli import main

sys.exit(main())
