"""The `rlsd` command line: train, eval, model conversion."""
