"""fanout: a message fan-out engine for live-streaming instant messaging."""

#: Kept equal to pyproject.toml's version (tests/test_config_cli.py checks).
__version__ = "0.1.0"
