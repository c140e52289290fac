import sys

from chatterbot.cli import main

sys.exit(main())
