"""Developer tooling, run from a checkout (``python -m tools.generate``); not part of the installed package."""
