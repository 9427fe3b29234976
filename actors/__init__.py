"""Data plane on Ray: engine adapters, engine and load-generator actors, the KV transport."""
