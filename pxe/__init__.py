"""Boot menus: what a PC boots and how its firmware is told.

catalog.py (the Catalog seam: BootHost, CatalogEntry, ConfigCatalog) -> booter.py (Booter: entries +
disk exports + kernel command lines = BootMenu, menu.py) -> ipxe.py / pxelinux.py / grub.py (three
renderers of the same BootMenu) -> service.py (TFTP providers) and bootd/http/boot.py (HTTP).
snapshots/catalog.py plugs the snapshot store into the same seam.
"""
