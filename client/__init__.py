"""Typed client (sync and asyncio) for editserve; imports neither torch nor transformers."""
