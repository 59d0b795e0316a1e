"""The peer-to-peer layer: identity, authenticated gRPC, DHT, relays, failure detection."""
