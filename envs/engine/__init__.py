"""The mini inference engine: paged KV cache, continuous batching, cluster, backends."""
