"""The one error type users see as a single line (bad params, bad data, unreachable server)."""


class UserError(Exception):
    """A problem the user can fix; the message names the file or key and the fix."""
