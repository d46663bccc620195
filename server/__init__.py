"""Model host, gRPC servicers, edit journal, metrics and the `editserve serve` command."""
