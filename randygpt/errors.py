"""The one exception type that means "the user asked for something we cannot do", and what
to say about a write the machine refused."""

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class UserError(Exception):
  """A mistake in the user's input: main prints the message alone, no traceback."""


def write_advice(code: int | None) -> str:
  """What to do about a write that failed with the OS error `code`, as the end of a
  sentence."""
  if code in DISK_FULL:
    return "free some disk space"
  if code in NOT_WRITABLE:
    return "make it writable"
  return "fix that"
