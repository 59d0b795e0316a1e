"""Protocol buffer definitions and their generated code, for the layers that speak on the wire."""
