"""The command line: `python -m frontends.cli generate|list-models|list-loras`."""
