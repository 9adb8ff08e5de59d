"""The ``stagewise`` command line."""
