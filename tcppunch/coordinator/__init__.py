"""The coordinator: registry and session state machines (sans-I/O) and the asyncio server that drives them."""
