"""The block layer: drivers, the node graph, probing, options, block status."""
