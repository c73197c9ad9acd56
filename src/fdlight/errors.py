"""User-facing errors: one line that names the bad thing and says how to fix it."""


class FDLightError(Exception):
    """Bad input from the user. `python -m fdlight` prints it as one line and exits with status 2."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FDLightError(message)
