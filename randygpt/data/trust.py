"""Which cached files a run may trust: those that no other user could have written. A cache
(compiled code, lowerings, token files) is loaded only from a directory that is this
user's (or root's) and writable by no one else, as are the directories above it; an entry
writable by another user is not loaded either. RANDYGPT_SHARED_CACHE=1 trusts a shared
team cache as it is (docs/data.md, "What the caches trust")."""

import grp
import os
import pwd
import stat
from pathlib import Path

SHARED_ENV = "RANDYGPT_SHARED_CACHE"


def shared() -> bool:
  """Whether the user trusts a cache that others can write (a team's shared cache)."""
  return os.environ.get(SHARED_ENV, "") not in ("", "0")


def _private_group(gid: int) -> bool:
  """Whether `gid` is this user's own group (named after them, no other members): many
  systems give each user one, and a umask of 002 then makes files group-writable."""
  try:
    group, user = grp.getgrgid(gid), pwd.getpwuid(os.geteuid()).pw_name
  except KeyError:
    return False
  return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _writable_by_others(info: os.stat_result, above: bool) -> str | None:
  """Why another user could change what a file or directory holds (None: no one can).
  `above`: a directory above the cache, where a sticky bit (/tmp) keeps others to their
  own entries."""
  if info.st_uid not in (os.geteuid(), 0):
    return f"owned by user {info.st_uid}"
  if info.st_mode & stat.S_IWOTH and not (above and info.st_mode & stat.S_ISVTX):
    return "writable by every user"
  if info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid):
    return f"writable by group {info.st_gid}"
  return None


def untrusted_directory(path: Path) -> str | None:
  """Why another user could change what `path` (a directory) holds, naming the directory
  at fault; None when no one else can, or with RANDYGPT_SHARED_CACHE=1. A missing
  directory is judged by what is above it (the run makes it)."""
  if shared():
    return None
  path = Path(os.path.abspath(path))
  for directory in (path, *path.parents):
    try:
      info = os.stat(directory)
    except OSError:
      continue  # Not made yet.
    if (why := _writable_by_others(info, above=directory != path)):
      return f"{directory} is {why}"
  return None


def trusted_entry(info: os.stat_result) -> bool:
  """Whether a cache entry (`info`: its `os.fstat`) is a regular file that no other user
  could have written."""
  return shared() or (stat.S_ISREG(info.st_mode)
                      and _writable_by_others(info, above=False) is None)
