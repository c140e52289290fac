"""ChatService: runs chat turns and serves conversation history."""
