"""The `fer` command: one entry point, one module per group of subcommands. Each module's
`add_commands` registers its subcommands; heavy libraries are imported inside the handlers, so
`fer --help` stays quick."""
