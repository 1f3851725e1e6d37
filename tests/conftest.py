"""Shared fixtures live in tests/plugins/, one module per concern."""

pytest_plugins = [
    "tests.plugins.tiny_models",
    "tests.plugins.s3",
    "tests.plugins.real_model",
    "tests.plugins.server",
    "tests.plugins.kube",
]
