"""``python -m seqrec_fast`` = the ``seqrec-fast`` command."""
import sys

from .cli import main

sys.exit(main())
