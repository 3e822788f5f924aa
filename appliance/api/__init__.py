"""The HTTP edge: the app factory, middleware, error mapping and routes."""
