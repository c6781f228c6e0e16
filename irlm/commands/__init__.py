"""One module per ``irlm`` subcommand (see irlm/cli.py)."""
