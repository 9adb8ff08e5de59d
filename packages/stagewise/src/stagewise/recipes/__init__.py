"""Recipe files shipped with core (``stagewise recipes`` lists them)."""
