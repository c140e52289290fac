"""InferenceService: server-streaming token generation over pluggable engines."""
