"""The warehouse domain: mobile robots among shelves and traffic (see :mod:`.base`)."""
