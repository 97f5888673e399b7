"""The committed golden traces (package data: ``importlib.resources.files("refimpl.golden.data")``).

This folder is installed as ``refimpl.golden.data`` (see ``setup.cfg``); it holds no code.
"""
