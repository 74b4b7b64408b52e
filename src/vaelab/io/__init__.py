"""Bytes on disk, the bottom room: atomic writes and checksums (``files``), image grids and PNG
encoding (``images``). Imports nothing of vaelab."""
