"""Reading and validating checkpoints on disk before any tensor byte is touched.

``safetensors_header`` parses and checks the header of one ``*.safetensors`` file
(strictly, without trusting any number written in it); ``checkpoint_files`` finds the
shards of a checkpoint directory, checks its ``model.safetensors.index.json`` and decides
which symlinks may be followed. Neither module imports torch.
"""
