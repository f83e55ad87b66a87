"""The training program that runs inside every pod (``python -m mfr.trainer``).

Importing this package must stay torch-free: ``mfr.ctl`` imports its config.
"""
