"""How a plugin repository tests itself: ``nox`` installs the plugin and runs its tests."""

import nox


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".", "pytest")
    # strict: a plugin that fails to load is an error here, not a warning
    session.run("pytest", "tests", *session.posargs, env={"STAGEWISE_STRICT_PLUGINS": "1"})
