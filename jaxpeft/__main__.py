"""`python -m jaxpeft` runs the CLI."""
import sys

from jaxpeft.cli import main

sys.exit(main())
