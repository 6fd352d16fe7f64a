import sys

from kfold.search.cli import main

sys.exit(main())
