"""The model folders: one registry for every kind of model file (checkpoints, LoRAs, ...).

A kind is a table entry (roots, extensions, classifier, hashes, name rules) in the spirit of
ComfyUI's `folder_paths`; `ModelFolders` scans, lists, resolves and hashes every kind the
same way, so a new kind is a classifier and a row, not a new registry.
"""
