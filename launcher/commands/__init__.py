"""CLI subcommands: one module each, discovered by chla_launcher.cli."""
