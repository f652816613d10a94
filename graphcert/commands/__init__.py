"""The `graphcert` subcommands that outgrew cli.py, one module each: argument definitions, the library
call, the printing. cli.py is the entry point and parses; it imports these."""
