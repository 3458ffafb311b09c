"""Device-tree files: TOML descriptions of a PCI machine -> ``DeviceTree``.

``load_tree(path)`` reads and validates a tree (docs/device-tree.md) and
returns a ``DeviceTree`` whose ``topology`` the kernel model serves;
``TreeError`` says which file, line and field is wrong. ``config.py`` lays
out config space bytes. Nothing here knows VFIO behaviour.
"""

from fakedev.tree.errors import TreeError
from fakedev.tree.loader import DeviceTree, default_tree_path, load_tree

__all__ = ["DeviceTree", "TreeError", "default_tree_path", "load_tree"]
