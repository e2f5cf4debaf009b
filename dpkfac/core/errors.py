"""The one exception type the command line turns into an `error:` line and exit status 2."""


class InputError(Exception):
    """Bad input from the user: a file, a flag, a model name. The message says what and where."""
