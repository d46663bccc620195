"""The science of editserve: architecture adapter, hooks, editing methods and tracing.

Nothing in here imports gRPC or the server: every function reads a model and returns data
(an artifact, a trace grid), so it runs the same in a notebook, a test or the server.
"""
