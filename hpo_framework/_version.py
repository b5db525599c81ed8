"""The version of hpo, in one place (the face, the CLIs and the worker registry read it)."""

__version__ = "0.1.0"
