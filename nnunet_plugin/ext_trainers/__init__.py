"""Folder for ``nnUNet_extTrainer``: nnU-Net imports each module here and looks for the trainer class by name."""
