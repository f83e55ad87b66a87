"""charts/ as package data: the Helm chart ships with ``pip install mfr``, so mfrctl renders it without a checkout."""
