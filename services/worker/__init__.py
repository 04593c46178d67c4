"""The worker: pulls generation requests from Redis Streams, batches them,
runs the model, and streams tokens back. The only service that imports torch."""
