"""Imports a package that is not installed: the error must name it, not just the class path."""

import a_dependency_that_is_not_installed  # noqa: F401
