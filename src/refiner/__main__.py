"""``python -m refiner``: the ``refiner`` command."""
import sys

from .cli import main

sys.exit(main())
