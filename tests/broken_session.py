"""A session module whose import fails, as a user's module with a bug would."""

raise RuntimeError("this module is broken on purpose")
