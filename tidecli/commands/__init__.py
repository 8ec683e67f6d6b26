"""Command bodies: each parses nothing, calls the library, renders. Imported lazily by cli.py."""
