"""ContextService: recent turns per conversation in Redis, handed out within a token budget."""
