"""Pipeline stages, one module each; they talk only through bounded asyncio queues."""
