"""The engine: one deterministic, resumable loop that runs a recipe's stages."""
