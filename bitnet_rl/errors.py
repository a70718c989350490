"""Errors a user can fix. The CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input: a path, a recipe key, a value, a data line.

    The message must name the culprit (file, field, value) so that one line is enough.
    """
