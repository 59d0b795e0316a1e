"""The gossamer command. Wiring only: parses, builds configs, calls the layers."""
