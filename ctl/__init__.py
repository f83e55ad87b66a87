"""mfrctl: the command-line interface.  Never imports torch."""
