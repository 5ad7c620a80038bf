import sys

from extractor.forget.command import main

sys.exit(main())
