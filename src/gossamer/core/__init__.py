"""Config dataclasses, the error tree, ids, the clock and hashing. No I/O."""
