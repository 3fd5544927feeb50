"""One module per `tl` command; each exposes run(cfg). Commands never import each other."""
