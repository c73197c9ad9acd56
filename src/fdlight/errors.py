"""User-facing errors: one line that names the bad thing and says how to fix it."""


class FDLightError(Exception):
    """Bad input from the user. `python -m fdlight` prints it as one line and exits with status 2."""

    run_started = False  # set once the run has claimed its directory: the error then belongs in the run's log


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FDLightError(message)


class Unreadable(Exception):
    """An image file that could not be opened or decoded (the datasets skip and count it, or stop under
    data.strict=true)."""
