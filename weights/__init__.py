"""Embedded default weights of jaxcrystal (data only; installed as the package `jaxcrystal_weights`).

See `MANIFEST` for the source, sha256, licence and conversion command of every file.
"""
