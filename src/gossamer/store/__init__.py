"""Storage: content-addressed blobs and the verified, atomic checkpoint format."""
