"""The command line: `bastion` and its subcommands, one module per group of commands."""
