"""``anatomix-node``: the command line (``main`` dispatches to the role modules beside it)."""
