"""The board profiles shipped with explorer, installed as the package data of `explorer.targets`.

A package (not a plain folder) so that an editable install maps it like the wheel does; the
profiles are read with importlib.resources (explorer/boards.py).
"""
