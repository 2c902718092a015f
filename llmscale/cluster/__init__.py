"""Serving at cluster scale: engine replicas on Ray Serve, routed with knowledge of the LLM.

`llmscale.ray_cluster` (shared with an engine's worker ranks on Ray) starts a loopback-only Ray
head in this process or joins a running cluster; Ray Serve deployments hold one engine per
replica; an LLM-aware router sends each request to the replica whose KV cache already holds
its prompt prefix, bounded by load (`routing`); and `llmscale cluster` is the command line
that starts it all. Nothing here imports Ray at package load, so `import llmscale.cluster`
stays cheap.
"""
