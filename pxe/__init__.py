"""Boot menus: what a PC boots and how its firmware is told.

bootd/bootplan.py (the one boot decision: settings, entries with snapshots, default, disks) ->
booter.py (Booter: the plan + disk exports + kernel command lines = BootMenu, menu.py) -> ipxe.py /
pxelinux.py / grub.py (three renderers of the same BootMenu) -> service.py (TFTP providers) and
bootd/http/boot.py (HTTP). catalog.py keeps the Catalog seam (BootHost, CatalogEntry, ConfigCatalog):
another source of entries, put through the plan's rules.
"""
