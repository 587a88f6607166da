"""One module per ``emloc`` sub-command: argument parsing and printing only, the work lives in ``emloc``."""
