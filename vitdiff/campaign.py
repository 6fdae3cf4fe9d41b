"""``python -m vitdiff.campaign 04 --profile cpu-long``: the long campaign (:mod:`vitdiff.workbook.campaign`)."""
import sys

from .workbook.campaign import main

if __name__ == "__main__":
    sys.exit(main())
