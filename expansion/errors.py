"""The one exception a user sees from the expansion package."""


class ExpansionError(RuntimeError):
    """A clear, user-facing failure of an expansion run: one line with the cause and the fix."""


class SettingsError(ExpansionError, ValueError):
    """A setting with a value outside its allowed range (also a ValueError, as a bad argument is)."""
