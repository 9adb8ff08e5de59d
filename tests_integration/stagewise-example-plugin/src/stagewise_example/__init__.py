"""stagewise-example-plugin: mine hard examples by loss, train on them, add an entropy bonus.

The plugin module is :mod:`stagewise_example.plugin`; importing this package imports no torch.
"""
