"""The routed model: the core's layers injected into a transformers model, routing around every forward and
`generate`, unloading and merging."""
