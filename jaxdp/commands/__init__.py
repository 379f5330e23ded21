"""The `jaxdp` subcommands (see jaxdp/cli.py), each a module with `main(argv) -> status`."""
