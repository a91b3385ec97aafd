"""The data package's one exception type, for problems a user can cause with data.

Missing, incomplete or unreadable dataset files, too few images or classes for the task split,
an unknown dataset or class-order name: each raises `DataError` with one line that says what to
do. Entry points print its message as one line and exit with code 2. Mistakes of a library caller
(a bad argument that the command line validates before) raise ValueError instead.
"""


class DataError(Exception):
    """A problem with the data that the user can fix: a missing or unreadable file, too few images."""
