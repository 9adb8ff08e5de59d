"""Core's own stages, losses, models, datasets and recipes, registered like any plugin's."""
