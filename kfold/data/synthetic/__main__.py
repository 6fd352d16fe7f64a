import sys

from kfold.data.synthetic.writer import main

sys.exit(main())
