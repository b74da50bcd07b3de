"""Compiled cores of macula (built from ``_ext/*.pyx``). Import them from ``macula``."""
