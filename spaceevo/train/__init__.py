"""Supernet training; :mod:`spaceevo.train.data` holds the data sets, their splits and loaders."""
