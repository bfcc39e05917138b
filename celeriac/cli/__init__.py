"""The ``celeriac`` command line."""
