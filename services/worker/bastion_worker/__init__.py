"""The worker: pulls generation requests from Redis Streams, batches them,
runs the model, and streams tokens back. The only service that imports torch."""

import os

# Bastion never fetches weights from a hub: models are local folders. Set before
# huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
