"""The bus layer: what every connection nexus-bus opens shares (see docs/runtime.md)."""
