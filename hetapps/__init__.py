"""The commands (train, parity, bench): the top layer, above hetcore and the two framework
packages. `hetapps.registry` is the one place that maps a framework's name to its package."""
