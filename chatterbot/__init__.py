"""What every ChatterBot service shares: settings, generated contracts (chatterbot.v1), the gRPC server
bootstrap, the breaker-guarded client, the launcher and the `chatterbot` CLI."""
