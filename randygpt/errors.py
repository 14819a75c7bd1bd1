"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
  """A mistake in the user's input: main prints the message alone, no traceback."""
