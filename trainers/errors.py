"""Errors a user can fix: entry points print them as one line and exit 2, never a traceback."""


class UserError(Exception):
    """Bad configuration, data or paths; the message names the key, file or line at fault."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe that does not match the schema."""
