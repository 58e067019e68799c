"""HTTP surfaces, one module each; every module exports `routes`."""
