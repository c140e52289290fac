"""What every ChatterBot service shares: settings, generated contracts (chatterbot.v1), the gRPC server
bootstrap, the breaker-guarded client, the launcher and the `chatterbot` CLI."""

import os as _os

# Every child this project starts is fork+exec; gRPC's fork handlers are not needed, and with other gRPC
# threads running they can deadlock a fork. Must be set before gRPC initializes.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
