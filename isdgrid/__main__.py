"""``python -m isdgrid`` runs the command line."""

from .cli import main

main()
