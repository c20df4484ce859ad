"""Hydra configs of `dsl run`, shipped inside the package so that `dsl` works from any folder."""
