"""The data layer: manifest, tiles, cache, class tables and the checks on them."""
