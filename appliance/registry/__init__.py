"""The model registry service: catalogue entries in SQLite behind a small HTTP API."""
