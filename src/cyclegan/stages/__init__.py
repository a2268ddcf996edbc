"""One module per `cyclegan` command, each a thin driver over the core; no stage imports another."""
