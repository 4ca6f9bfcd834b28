"""The one exception type a user can cause. The CLI turns it into one line on stderr and exit code 2."""

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing file, incompatible resume).

    The message is the whole story: what is wrong, where (file, line, key) and what to do.
    """
