"""The HTTP service: settings, schemas, the dynamic batcher, metrics, routes and the app."""
