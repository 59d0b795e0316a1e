"""Collectives: group formation, fault-tolerant all-reduce, compression codecs."""
