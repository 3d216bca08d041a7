"""`python -m helexa_native` runs the `helexa-native` command."""

import sys

from .cli import main

sys.exit(main())
