"""The one exception type that means "the user can fix this": reported as one line, exit status 2."""


class UserError(Exception):
    """A problem with the user's input or environment: reported as one line, exit status 2."""
