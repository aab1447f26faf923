"""The Hub edge: one client context (:class:`~hubmerge.hub.client.HubClient`), checkpoint branches in training
order, trajectory integrity, pulling into the HF cache and pushing merges. Everything goes through the real
``huggingface_hub`` client."""
