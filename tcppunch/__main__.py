"""``python -m tcppunch`` runs the command-line interface."""

from tcppunch.cli import main

main()
