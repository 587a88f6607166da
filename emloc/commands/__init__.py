"""One module per ``emloc`` sub-command: argument parsing and printing only, the work lives in ``emloc``.

Options that several sub-commands take are defined once, in :mod:`emloc.commands.options`. Commands raise
:class:`emloc.errors.UserError` (or let an ``OSError`` through) for bad input; ``emloc.cli`` prints it as
one line.
"""
