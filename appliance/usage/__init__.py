"""Per-key usage: what each API key used of each model, kept in SQLite, and token quotas."""
