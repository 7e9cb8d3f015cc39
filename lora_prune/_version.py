"""The package's version, in a module of its own so that any module can record it.

Slim files, verification records and analysis manifests carry the version;
taking it from here instead of the package root keeps those imports pointing
down (the root imports the library, never the other way round).
pyproject.toml states the same number (tests/test_code_style.py checks).
"""

__version__ = "0.1.0"
