"""`python -m gossamer.cli` runs the `gossamer` command."""

from gossamer.cli.main import main

main()
