"""twistmail: bulk mail on Twisted."""
