"""The one exception type that reaches the user as a single ``error:`` line."""


class UserError(Exception):
    """Bad input a user can act on: a path, a config key, a checkpoint. Printed, not traced."""
