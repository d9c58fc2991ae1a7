"""One module per `dynaexq` subcommand (see `dynaexq.cli`)."""
