"""Hosts' disks over NBD: per-host qcow2 overlays over OS snapshots, exported by one supervised
qemu-storage-daemon (the brief's `nbd/`; named `nbdexport` so libnbd's `nbd` module stays importable).

`ctx.disks` is a `nbdexport.manager.DiskManager`; see its module docstring for when a boot starts.
"""
