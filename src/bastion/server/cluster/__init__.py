"""How nodes share state: one process (local) or many through Redis."""
