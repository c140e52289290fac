"""Operating ChatterBot: the `chatterbot` CLI, the launcher of a whole mesh (`chatterbot up`) and the embedded
NATS, PostgreSQL and Valkey servers it starts. Services never import this package; it starts them."""
