"""``python -m charts.generate`` from the checkout's root."""

from . import main

main()
