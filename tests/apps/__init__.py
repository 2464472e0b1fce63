"""Importable apps for the command-line tests (``--app tests.apps.cli_app:durably``)."""
