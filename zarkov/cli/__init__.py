"""The ``zcmd`` command line: option parsing and command lookup, nothing else."""
