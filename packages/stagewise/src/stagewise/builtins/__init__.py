"""Core's own stages, losses, models, datasets and recipes, registered like any plugin's (``plugin``), and
core's event plugins: the loss curves plot (``curves``) and TensorBoard scalars (``tensorboard``)."""
