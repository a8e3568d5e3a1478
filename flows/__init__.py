"""Prefect flows, the stage registry, DVC bookkeeping and the `ms2rgb` command line."""
