"""YAML configs shipped as package data (``importlib.resources.files("loopsim.configs")``)."""
