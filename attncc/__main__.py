"""`python -m attncc ...` is the `attncc` command."""
import sys

from .cli import main

sys.exit(main())
