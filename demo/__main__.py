"""`make demo`: python -m demo (inside tests/sandbox)."""

import sys

from demo.acts import main

sys.exit(main())
