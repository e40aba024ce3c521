"""``python -m sclatent`` is the ``sclatent`` command."""

import sys

from .cli import main

sys.exit(main())
