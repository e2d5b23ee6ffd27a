"""`make bench`: the service's figures on this machine (see bench/__main__.py)."""
