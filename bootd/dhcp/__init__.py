"""DHCP and proxyDHCP for PXE: sans-IO codec and policy, the lease table, the asyncio adapter."""
