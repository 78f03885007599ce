"""The ``fast`` load format: plan (replay upstream's loaders on meta tensors), validate, read, copy."""
