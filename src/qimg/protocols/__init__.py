"""Protocol nodes: where an image's bytes live."""
