"""StoreService: users, conversations, messages and job results in PostgreSQL, every row keyed by user id."""
