"""A plugin whose import fails: lorag must name it and keep serving other domains."""

import lorag_module_that_does_not_exist  # noqa: F401
