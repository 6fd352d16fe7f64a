import sys

from foldwise.commands import main

sys.exit(main())
