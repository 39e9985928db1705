"""``python -m blens_fast ...`` is the ``blens`` command."""
import sys

from .cli import main

sys.exit(main())
